"""The legend of a class map: class names and colours, as a GIS and a STAC reader want them.

A prediction COG carries the legend three ways, so that every reader finds it:

- its colour table (TIFF palette): GDAL, QGIS and every web viewer show the classes in their FLAIR colours;
- dataset tags ``classes`` (a JSON list of names) and ``class_colors`` (hex), inside the file;
- a GDAL PAM sidecar (``<name>.tif.aux.xml``) with the band's category names: GDAL keeps category names of a
  GeoTIFF only there, and reads it beside the file (locally, or over ``/vsis3/`` / ``/vsicurl/``).
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass
from xml.sax.saxutils import escape

from terradapt.classes import DUBAI_CLASSES, DUBAI_PALETTE, FLAIR_CLASSES, FLAIR_PALETTE, IGNORE_INDEX

RGB = tuple[int, int, int]


def _generated(count: int) -> tuple[RGB, ...]:
    """Distinct colours for a nomenclature without a published palette (evenly spaced hues)."""
    colours = []
    for i in range(count):
        r, g, b = colorsys.hsv_to_rgb(i / max(count, 1), 0.75, 0.9)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return tuple(colours)


@dataclass(frozen=True)
class Legend:
    """Class names (index = pixel value) and their colours; ``nodata`` pixels are transparent."""

    names: tuple[str, ...]
    colors: tuple[RGB, ...]
    nodata: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if len(self.names) != len(self.colors):
            raise ValueError(f"{len(self.names)} class names but {len(self.colors)} colours; accepted: one each")
        if not 0 < len(self.names) <= self.nodata:
            raise ValueError(f"{len(self.names)} classes; accepted: 1 to {self.nodata} (pixel values below nodata)")

    @classmethod
    def for_classes(cls, names: tuple[str, ...]) -> Legend:
        """The legend of a nomenclature: FLAIR's and Dubai's published colours, else generated ones."""
        if names == FLAIR_CLASSES:
            return cls(names, FLAIR_PALETTE)
        if names == DUBAI_CLASSES:
            return cls(names, DUBAI_PALETTE[: len(DUBAI_CLASSES)])
        return cls(names, _generated(len(names)))

    def hex_colors(self) -> tuple[str, ...]:
        """Colours as ``rrggbb`` hex (the STAC classification extension's ``color_hint``)."""
        return tuple(f"{r:02x}{g:02x}{b:02x}" for r, g, b in self.colors)

    def colormap(self) -> dict[int, tuple[int, int, int, int]]:
        """The GDAL colour table: each class opaque, nodata transparent."""
        table = {i: (*rgb, 255) for i, rgb in enumerate(self.colors)}
        table[self.nodata] = (0, 0, 0, 0)
        return table

    def tags(self) -> dict[str, str]:
        """Dataset tags that name the classes inside the file."""
        return {"classes": json.dumps(list(self.names)), "class_colors": json.dumps(list(self.hex_colors()))}

    def aux_xml(self) -> bytes:
        """The GDAL PAM sidecar naming band 1's categories (value i = ``names[i]``; nodata = "nodata")."""
        categories = [*self.names, *[""] * (self.nodata - len(self.names)), "nodata"]
        lines = ["<PAMDataset>", '  <PAMRasterBand band="1">', "    <CategoryNames>"]
        lines += [f"      <Category>{escape(name)}</Category>" for name in categories]
        lines += ["    </CategoryNames>", "  </PAMRasterBand>", "</PAMDataset>", ""]
        return "\n".join(lines).encode()

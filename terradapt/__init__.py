"""terradapt core: typed records, raster I/O, datasets, model and checkpoint format, settings, errors.

This package imports nothing from the other terradapt layers (stream, serving, adapters, monitoring).
"""

__version__ = "0.1.0"

"""Typed errors raised at the edges of terradapt.

Every validation error names the offending field, the value seen and what would be accepted, so that an
operator reading a dead-letter record knows what to fix without opening the code.
"""

from __future__ import annotations

from typing import Any, ClassVar


class TerradaptError(Exception):
    """Base class of every error terradapt raises on purpose."""

    #: Short machine-readable reason used in dead-letter records and metric labels (bounded set).
    reason: str = "error"


class _InputContractError(Exception):
    """Mixin of the input-contract errors: the field, the value seen and what is accepted, in one message.

    Not a ``TerradaptError`` itself (it has no dead-letter reason of its own): each input's error class names
    its ``subject`` and default ``reason``; ``reason=`` narrows it to one of that error's bounded set.
    """

    subject: ClassVar[str]
    reason: str

    def __init__(self, field: str, value: Any, accepted: str, *, reason: str | None = None) -> None:
        self.field = field
        self.value = value
        self.accepted = accepted
        if reason is not None:
            self.reason = reason
        super().__init__(f"invalid {self.subject}: {field}={value!r}; accepted: {accepted}")


class InvalidTileError(_InputContractError, TerradaptError, ValueError):
    """A raster does not satisfy the input contract (bands, dtype, CRS, size, nodata...)."""

    reason = "invalid_tile"
    subject = "tile"


class CorruptTileError(InvalidTileError):
    """The bytes are not a readable GeoTIFF (corrupt or truncated)."""

    reason = "corrupt_tile"

    def __init__(self, detail: str) -> None:
        super().__init__("file", detail, "a complete, readable GeoTIFF")


class OversizedTileError(InvalidTileError):
    """The raster (or its encoded bytes) exceeds the configured size limit."""

    reason = "oversized_tile"


class InvalidPayloadError(TerradaptError, ValueError):
    """A message payload is not valid JSON or does not match its record schema."""

    reason = "malformed_payload"


class UnknownRegionError(TerradaptError, LookupError):
    """A region code is not one terradapt serves."""

    reason = "unknown_region"

    def __init__(self, region: str, known: list[str] | None = None) -> None:
        self.region = region
        hint = f"; known regions: {', '.join(sorted(known))}" if known else ""
        super().__init__(
            f"unknown region {region!r}: expected a departement code like 'D033' or a dataset area like 'dubai-3'{hint}"
        )


class ObjectNotFoundError(TerradaptError, LookupError):
    """An object referenced by a message does not exist in storage."""

    reason = "missing_object"

    def __init__(self, uri: str) -> None:
        self.uri = uri
        super().__init__(f"object not found: {uri}")


class ForbiddenHrefError(TerradaptError, PermissionError):
    """An href names something a worker may not read (another bucket, a file outside the root, a device...)."""

    reason = "forbidden_href"

    def __init__(self, href: str, accepted: str) -> None:
        self.href = href
        super().__init__(f"href {href!r} not allowed; accepted: {accepted}")


class ModelVersionNotFoundError(TerradaptError, LookupError):
    """A model version is not in the registry."""

    reason = "missing_model_version"

    def __init__(self, region: str, version: str | int) -> None:
        self.region = region
        self.version = version
        super().__init__(f"model version {version!r} not found for region {region!r}")


class ChecksumMismatchError(TerradaptError, ValueError):
    """Stored weights do not match the sha256 recorded in their manifest."""

    reason = "checksum_mismatch"

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"sha256 mismatch for {what}: manifest says {expected}, content is {actual}")


class UnknownNameError(TerradaptError, KeyError):
    """A registry lookup by name failed; the message lists the valid names."""

    reason = "unknown_name"

    def __init__(self, kind: str, name: str, available: list[str]) -> None:
        self.kind = kind
        self.name = name
        self.available = available
        super().__init__(f"unknown {kind} {name!r}; available: {', '.join(sorted(available))}")

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


class InvalidSeriesError(_InputContractError, TerradaptError, ValueError):
    """A parcel or patch time series does not satisfy the input contract (dates, bands, shape, NaN share).

    ``reason`` is one of a bounded set: ``dates_not_increasing``, ``wrong_band_count``, ``nan_share``,
    ``invalid_series`` (anything else: shape, dtype, size, cloud mask).
    """

    reason = "invalid_series"
    subject = "series"


class UnknownCaptureTimeError(TerradaptError, ValueError):
    """Nothing dates a tile and no campaign bounds it (``terradapt ingest`` does not invent a capture time)."""

    reason = "unknown_capture_time"

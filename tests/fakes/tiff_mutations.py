"""Byte-level mutations of small valid GeoTIFF tiles (hypothesis strategies), and a memory-capped reader process.

The base tiles are what the worker expects (5 uint8 bands, EPSG:2154, 64 x 64) in the layouts GDAL writes:
strips, deflate tiles with a predictor, band-interleaved LZW, JPEG, with a nodata value. A mutant applies 1 to 4
steps to one of them: bit flips, byte overwrites, truncation, splicing (another tile's tail, random bytes), and
changes of header tag values (width, height, bits per sample, compression, tile size, strip/tile offsets...) to
the values parsers trip on (0, 1, 2**16, 2**31 - 1, 2**32 - 1...).

``ReadWorker`` runs ``read_raster`` in a child process whose address space is capped (``RLIMIT_AS``), and reports
each read's outcome and the child's peak RSS, so a decode that allocates from what a header claims fails the
test (out of memory, or a peak above the budget) instead of taking the machine down; a read that does not answer
within its timeout is a hang.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import selectors
import struct
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from affine import Affine
from hypothesis import strategies as st
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile

#: the TIFF tags a mutation may rewrite, by name (baseline TIFF 6.0 and GeoTIFF)
TAGS = {
    "ImageWidth": 256,
    "ImageLength": 257,
    "BitsPerSample": 258,
    "Compression": 259,
    "Photometric": 262,
    "StripOffsets": 273,
    "SamplesPerPixel": 277,
    "RowsPerStrip": 278,
    "StripByteCounts": 279,
    "PlanarConfig": 284,
    "Predictor": 317,
    "TileWidth": 322,
    "TileLength": 323,
    "TileOffsets": 324,
    "TileByteCounts": 325,
    "SampleFormat": 339,
    "ModelPixelScale": 33550,
    "ModelTiepoint": 33922,
    "GeoKeyDirectory": 34735,
    "GDALNoData": 42113,
}

#: tag values that parsers trip on: zero, one, powers of two and their neighbours, the type limits
INTERESTING = (0, 1, 2, 3, 5, 7, 8, 15, 16, 17, 32, 64, 255, 256, 4096, 65535, 65536, 100_000, 2**31 - 1, 2**32 - 1)

SIZE = 64


def _encode(profile: dict[str, Any], seed: int, bands: int = 5, high: int = 200) -> bytes:
    data = np.random.default_rng(seed).integers(1, high, size=(bands, SIZE, SIZE)).astype("uint8")
    base = {
        "driver": "GTiff",
        "height": SIZE,
        "width": SIZE,
        "count": bands,
        "dtype": "uint8",
        "crs": "EPSG:2154",
        "transform": Affine(0.2, 0.0, 417_000.0, 0.0, -0.2, 6_425_000.0),
    }
    with MemoryFile() as mem, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with mem.open(**base, **profile) as dst:
            dst.write(data)
        return bytes(mem.read())


@functools.cache
def base_tiles() -> dict[str, bytes]:
    """The valid tiles every mutant starts from (encoded once per process)."""
    return {
        "strips": _encode({}, 0),
        "tiled-deflate": _encode(
            {"tiled": True, "blockxsize": 32, "blockysize": 32, "compress": "deflate", "predictor": 2}, 1
        ),
        "band-lzw": _encode({"interleave": "band", "compress": "lzw"}, 2),
        "jpeg": _encode(
            {"tiled": True, "blockxsize": 16, "blockysize": 16, "compress": "jpeg", "interleave": "band"}, 3
        ),
        "nodata-packbits": _encode({"nodata": 0, "compress": "packbits"}, 4),
    }


@functools.cache
def mask_tiles() -> dict[str, bytes]:
    """Valid delayed-label masks (one band of class indices) every mask mutant starts from."""
    return {
        "mask-strips": _encode({"nodata": 255}, 5, bands=1, high=13),
        "mask-tiled-lzw": _encode({"tiled": True, "blockxsize": 16, "blockysize": 16, "compress": "lzw"}, 6, 1, 13),
    }


def ifd_entries(data: bytes) -> dict[int, tuple[int, int, int]]:
    """The first IFD of a little-endian classic TIFF: tag -> (entry offset, field type, count); {} otherwise."""
    if len(data) < 8 or data[:4] != b"II*\x00":
        return {}
    (offset,) = struct.unpack_from("<I", data, 4)
    if offset + 2 > len(data):
        return {}
    (n,) = struct.unpack_from("<H", data, offset)
    entries = {}
    for i in range(n):
        at = offset + 2 + 12 * i
        if at + 12 > len(data):
            break
        tag, kind, count = struct.unpack_from("<HHI", data, at)
        entries[tag] = (at, kind, count)
    return entries


def set_tag(data: bytes, tag: int, value: int) -> bytes:
    """Rewrite one tag's value field (an inline SHORT/LONG value, or the offset of an array); as is if absent."""
    entry = ifd_entries(data).get(tag)
    if entry is None:
        return data
    at, kind, count = entry
    out = bytearray(data)
    if kind == 3 and count <= 2:  # SHORT(s) stored inline: rewrite the first one
        struct.pack_into("<H", out, at + 8, value & 0xFFFF)
    else:  # LONG inline, or the offset of the values
        struct.pack_into("<I", out, at + 8, value & 0xFFFFFFFF)
    return bytes(out)


@dataclass(frozen=True)
class Mutant:
    """A mutated tile: which base, which steps (readable in a failure report), and the bytes."""

    base: str
    steps: tuple[str, ...]
    data: bytes

    def __repr__(self) -> str:
        return f"Mutant(base={self.base!r}, steps={self.steps!r}, size={len(self.data)})"


@st.composite
def _step(draw: st.DrawFn, data: bytes) -> tuple[str, bytes]:
    n = max(len(data), 1)
    # positions favour the header and the IFD region, where a flipped bit changes what a parser believes
    position = draw(st.one_of(st.integers(0, min(n - 1, 1024)), st.integers(0, n - 1)))
    kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "splice", "insert", "tag", "tag"]))
    if kind == "flip":
        bit = draw(st.integers(0, 7))
        out = bytearray(data)
        if out:
            out[position % len(out)] ^= 1 << bit
        return f"flip byte {position} bit {bit}", bytes(out)
    if kind == "overwrite":
        chunk = draw(st.binary(min_size=1, max_size=16))
        return f"overwrite {position} with {chunk.hex()}", data[:position] + chunk + data[position + len(chunk) :]
    if kind == "truncate":
        return f"truncate to {position}", data[:position]
    if kind == "splice":
        other_name = draw(st.sampled_from(sorted(base_tiles())))
        other = base_tiles()[other_name]
        at = draw(st.integers(0, len(other) - 1))
        return f"splice {other_name}[{at}:] at {position}", data[:position] + other[at:]
    if kind == "insert":
        chunk = draw(st.binary(min_size=1, max_size=64))
        return f"insert {chunk.hex()} at {position}", data[:position] + chunk + data[position:]
    name = draw(st.sampled_from(sorted(TAGS)))
    value = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**32 - 1)))
    return f"set {name}={value}", set_tag(data, TAGS[name], value)


@st.composite
def mutants(draw: st.DrawFn, max_steps: int = 4, masks: bool = False) -> Mutant:
    """A valid base tile (or label mask) with 1 to ``max_steps`` mutations applied in turn."""
    bases = mask_tiles() if masks else base_tiles()
    base = draw(st.sampled_from(sorted(bases)))
    data = bases[base]
    steps = []
    for _ in range(draw(st.integers(1, max_steps))):
        description, data = draw(_step(data))
        steps.append(description)
    return Mutant(base, tuple(steps), data)


# == the memory-capped reader ======================================================================================
@dataclass(frozen=True)
class ReadResult:
    """What one read in the child ended as.

    Attributes:
        outcome: ``ok`` (a raster), ``typed`` (a TerradaptError), ``unexpected`` (any other exception),
            ``oom`` (GDAL or numpy ran out of the capped address space), ``crashed`` (the child died),
            ``hang`` (no answer within the timeout).
        error: The exception's class name, when one was raised.
        reason: The TerradaptError's reason.
        message: The exception's text (or the crash's exit status).
        peak_growth: The child's peak RSS during this read above its RSS before the first read, in bytes.
        refused: GDAL refused an allocation a corrupt header asked for (its own sanity limit).

    """

    outcome: str
    error: str = ""
    reason: str = ""
    message: str = ""
    peak_growth: int = 0
    refused: bool = False


def memory_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in bytes.

    Not ``getrusage().ru_maxrss``: Linux carries the parent's peak into a child across fork + exec, so a child
    of a big pytest process would report that peak and hide its own allocations.
    """
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(f"{field}:"))


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0), so the next peak is that of what runs next."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:  # not allowed here: the peak stays the process's since exec, still an upper bound
        pass


def _read_once(payload: bytes, spec: Any) -> dict[str, Any]:
    from terradapt.errors import TerradaptError
    from terradapt.raster import read_raster

    try:
        read_raster(payload, spec)
    except MemoryError as exc:
        return {"outcome": "oom", "error": type(exc).__name__, "message": str(exc)}
    except TerradaptError as exc:
        return {"outcome": "typed", "error": type(exc).__name__, "reason": exc.reason, "message": str(exc)[:500]}
    except Exception as exc:  # what the fuzz test is looking for: reported, never raised
        return {"outcome": "unexpected", "error": type(exc).__name__, "message": repr(exc)[:500]}
    return {"outcome": "ok"}


def _serve(spec_fields: dict[str, Any], budget: int, safety: int) -> None:
    """The child's loop: length-prefixed payloads in on stdin, one JSON line per read out on stdout.

    The soft address-space limit is ``budget`` above the warmed-up process, the hard one ``safety`` above it.
    A read refused with an out-of-memory error under the soft limit is read again under the hard one: if it then
    succeeds, it needed more than the budget (``oom``); if GDAL refuses it again, the refusal was GDAL's own
    sanity limit on a corrupt header (a typed error, as in production). Either way the peak RSS is reported.
    """
    from terradapt.raster import RasterSpec

    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in spec_fields.items()}
    spec = RasterSpec(**fields)
    _read_once(base_tiles()["strips"], spec)  # warm GDAL up before measuring
    vm = memory_bytes("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (vm + budget, vm + safety))
    baseline = memory_bytes("VmRSS")
    stdin, stdout = sys.stdin.buffer, sys.stdout
    while header := stdin.read(4):
        (length,) = struct.unpack("<I", header)
        payload = stdin.read(length)
        reset_peak()
        result = _read_once(payload, spec)
        text = result.get("message", "").lower()
        if result["outcome"] == "typed" and ("out of memory" in text or "cannot allocate" in text):
            resource.setrlimit(resource.RLIMIT_AS, (vm + safety, vm + safety))
            again = _read_once(payload, spec)
            resource.setrlimit(resource.RLIMIT_AS, (vm + budget, vm + safety))
            if again["outcome"] == "ok":
                result = {"outcome": "oom", "message": "needed more than the address-space budget to decode"}
            else:
                result = {**again, "refused": True}
        result["peak_growth"] = memory_bytes("VmHWM") - baseline
        stdout.write(json.dumps(result) + "\n")
        stdout.flush()


class ReadWorker:
    """``read_raster`` in a child process with a capped address space; restarted after a crash or a hang.

    Args:
        spec: The ``RasterSpec`` fields the child reads with (JSON-able values).
        budget: Bytes of address space a read may map above the warmed-up child: more is an ``oom`` outcome.
        safety: Bytes of address space the child may never exceed (a runaway allocation fails there, not on this
            machine).
        timeout: Seconds a read may take before it counts as a hang.

    """

    def __init__(
        self, spec: dict[str, Any], budget: int = 512 << 20, safety: int = 3 << 30, timeout: float = 20.0
    ) -> None:
        self.spec = spec
        self.budget = budget
        self.safety = safety
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        code = (
            "import json, sys; from tests.fakes.tiff_mutations import _serve; "
            "_serve(json.loads(sys.argv[1]), *map(int, sys.argv[2:]))"
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GDAL_NUM_THREADS": "1"}
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(self.spec), str(self.budget), str(self.safety)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=root,
            env=env,
        )

    def read(self, payload: bytes) -> ReadResult:
        """Read one payload in the child."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(struct.pack("<I", len(payload)) + payload)
            proc.stdin.flush()
        except BrokenPipeError:
            return self._crashed()
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            if not selector.select(self.timeout):
                self.close()
                return ReadResult("hang", message=f"no answer within {self.timeout} s")
        line = proc.stdout.readline()
        if not line:
            return self._crashed()
        return ReadResult(**json.loads(line))

    def _crashed(self) -> ReadResult:
        assert self.proc is not None
        status = self.proc.wait(10)
        self.proc = None
        return ReadResult("crashed", message=f"reader exited with status {status}")

    def close(self) -> None:
        """Stop the child (by its own pid)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def describe(result: ReadResult) -> str:
    """One line for an assertion message."""
    return json.dumps(asdict(result))

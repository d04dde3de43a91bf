"""docs/benchmarks.md is shared by every benchmark: each one rewrites only its own section, between its markers."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = "# terradapt benchmarks\n\nWritten by the scripts in bench/.\n"


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace the section of ``bench/<name>.py`` (markers included) with ``body``, or append it."""
    start, end = f"<!-- bench/{name}.py:start -->", f"<!-- bench/{name}.py:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = doc.read_text() if doc.exists() else HEADER
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)

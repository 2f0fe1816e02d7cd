"""Search every stored artefact under an output folder for tell-tale bytes (GDPR tests).

Not a test module. Each file is searched as raw bytes, and Parquet files (compressed,
so raw bytes could hide a value) are also decoded cell by cell.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq


def _cells(value) -> Iterator[bytes]:
    if value is None:
        return
    if isinstance(value, (bytes, bytearray)):
        yield bytes(value)
    elif isinstance(value, str):
        yield value.encode("utf-8")
    elif isinstance(value, dict):
        for v in value.values():
            yield from _cells(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _cells(v)
    else:
        yield str(value).encode()


def stored_blobs(root: Path) -> Iterator[tuple[str, bytes]]:
    """(relative path, bytes) for every file under root, plus every decoded Parquet cell."""
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        data = path.read_bytes()
        yield rel, data
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            for name in table.column_names:
                for value in table[name].to_pylist():
                    for cell in _cells(value):
                        yield f"{rel}[{name}]", cell


def find(root: Path, needles: Iterable[bytes | str]) -> dict[str, set[str]]:
    """{needle: files (or file[column]) containing it}; needles never found are absent."""
    wanted = [n.encode("utf-8") if isinstance(n, str) else n for n in needles]
    hits: dict[str, set[str]] = {}
    for rel, data in stored_blobs(root):
        for n in wanted:
            if n in data:
                hits.setdefault(n.decode("latin-1"), set()).add(rel.split("[")[0])
    return hits

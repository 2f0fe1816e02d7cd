"""Print ``name==floor`` for each requirement of a pyproject extra, for pip to install.

CI installs the declared minimum versions of the ``serve`` extra and runs the serving tests
against them, so a floor that is too low (a release the code cannot run on) fails CI instead
of a user's install. Usage: ``python .ci/min_versions.py serve``.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# name, optional [extras], then a ">=" floor; any marker after ";" is kept for pip to evaluate.
_REQ = re.compile(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$")


def floors(extra: str, pyproject: Path) -> list[str]:
    data = tomllib.loads(pyproject.read_text())
    pins = []
    for req in data["project"]["optional-dependencies"][extra]:
        m = _REQ.match(req)
        if not m:
            raise SystemExit(f"cannot read the requirement {req!r} of extra {extra!r}")
        name, extras, spec, marker = m.group(1), m.group(2) or "", m.group(3), m.group(4) or ""
        floor = re.search(r">=\s*([0-9][^,\s]*)", spec)
        if not floor:
            raise SystemExit(f"{name} in extra {extra!r} declares no '>=' floor ({req!r}): give it one")
        pins.append(f"{name}{extras}=={floor.group(1)}{marker}")
    return pins


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    print("\n".join(floors(sys.argv[1], root / "pyproject.toml")))

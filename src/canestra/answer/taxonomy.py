"""Fruit families: which family each class belongs to ("Apple Red 2" -> Apple).

canestra ships a table for the Fruits-360 classes (``conf/taxonomy.csv``, columns
``class,family``); names such as "Limes", "Cocos", "Maracuja" or "Nut Forest" are
listed there by hand because their first word is not their family. A user table
(``--taxonomy FILE.csv``) overrides or extends the shipped rows. A class in neither
gets a family by rule: its first word when that is a known family, else its name
without a trailing number ("Dragonfruit 2" -> "Dragonfruit").

A training root whose folders are all family names (``real-photos/Apple/...``)
teaches the family-level answer: its images get the class label ``"Apple (family)"``,
which never counts as a variety.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from importlib import resources

from canestra.errors import InputError

FAMILY_SUFFIX = " (family)"
UNKNOWN = "unknown"  # the answer when an image resembles no training class
# Class label of --unknown-images rows: photos of things that are none of the families. It has no
# family, so a photo it wins is answered "unknown". Parenthesised: no Fruits-360 folder is named so.
OTHER_LABEL = "(none of the families)"
_TRAILING_NUMBER = re.compile(r"(\s+\d+)+$")


def family_label(family: str) -> str:
    """Class label of family-level training images, e.g. ``"Apple (family)"``."""
    return f"{family}{FAMILY_SUFFIX}"


def is_family_label(label: str) -> bool:
    return label.endswith(FAMILY_SUFFIX)


def is_variety_label(label: str) -> bool:
    """A class that names a variety: neither family-level nor the "none of the families" class."""
    return not label.endswith(FAMILY_SUFFIX) and label != OTHER_LABEL


def _read_rows(text: str, where: str) -> dict[str, str]:
    reader = csv.DictReader(io.StringIO(text))
    cols = [c.strip().lower() for c in (reader.fieldnames or [])]
    missing = [c for c in ("class", "family") if c not in cols]
    if missing:
        raise InputError(f"taxonomy file {where} needs the columns class,family (missing: {', '.join(missing)}; "
                         f"found: {', '.join(reader.fieldnames or []) or 'nothing'})")
    reader.fieldnames = cols
    rows: dict[str, str] = {}
    for n, row in enumerate(reader, start=2):
        cls, fam = (row.get("class") or "").strip(), (row.get("family") or "").strip()
        if not cls or not fam:
            raise InputError(f"taxonomy file {where}, line {n}: both class and family must be filled in")
        key = cls.lower()
        if key in rows and rows[key] != fam:
            raise InputError(f"taxonomy file {where}, line {n}: class {cls!r} is given two families "
                             f"({rows[key]!r} and {fam!r})")
        rows[key] = fam
    return rows


@dataclass
class Taxonomy:
    """class -> family, case-insensitive on the class name."""

    rows: dict[str, str] = field(default_factory=dict)  # lower-cased class -> family

    def __post_init__(self) -> None:
        # lower-cased family -> family as spelled in the table (first spelling, sorted, wins)
        self._family_by_lower: dict[str, str] = {}
        for fam in sorted(set(self.rows.values())):
            self._family_by_lower.setdefault(fam.lower(), fam)

    @property
    def families(self) -> set[str]:
        return set(self._family_by_lower.values())

    def canonical_family(self, name: str) -> str | None:
        """The family spelled as in the table (``"apple"`` -> ``"Apple"``), or None."""
        return self._family_by_lower.get(name.strip().lower())

    def family(self, label: str) -> str:
        if label == OTHER_LABEL:
            return ""
        if is_family_label(label):
            return label[: -len(FAMILY_SUFFIX)]
        hit = self.rows.get(label.strip().lower())
        if hit:
            return hit
        first = label.split()[0] if label.split() else label
        known = self.canonical_family(first)
        if known:
            return known
        return _TRAILING_NUMBER.sub("", label).strip() or label

    def families_of(self, labels: list[str]) -> list[str]:
        return [self.family(lb) for lb in labels]

    def is_family_root(self, folder_names: list[str]) -> bool:
        """True when every folder is a family name and at least one is not also a class name.

        ``real-photos/{Apple,Banana,Orange}`` is family-level ("Apple" is no Fruits-360 class);
        ``fruits-360/{Banana,Kiwi,...,Apple Red 1}`` is variety-level.
        """
        names = [n for n in folder_names if n]
        if not names or not all(self.canonical_family(n) for n in names):
            return False
        return any(n.strip().lower() not in self.rows for n in names)


def load_taxonomy(path: str | None = None) -> Taxonomy:
    """The shipped table, overridden/extended by ``path`` (a CSV with columns class,family)."""
    shipped = resources.files("canestra").joinpath("conf").joinpath("taxonomy.csv").read_text(encoding="utf-8")
    rows = _read_rows(shipped, "conf/taxonomy.csv (shipped)")
    if path:
        local = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(local):
            raise InputError(f"taxonomy file {local} does not exist: pass a CSV with the columns class,family")
        try:
            with open(local, encoding="utf-8-sig") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the taxonomy file {local} ({exc}): it must be a UTF-8 CSV "
                             "with the columns class,family") from None
        user = _read_rows(text, local)
        if not user:
            raise InputError(f"taxonomy file {local} has no rows: add lines like 'Apple Red 2,Apple'")
        rows.update(user)
    return Taxonomy(rows)

"""Reading what ``canestra predict`` and ``canestra watch`` wrote, for the drift monitor (pyarrow, no Spark).

The predictions table is a folder of Parquet files (``OUT/predictions/``): Spark's parts from
``predict``, one ``batch-*.parquet`` per micro-batch from ``watch``. Files written before canestra
wrote the monitor's columns lack them; their rows are counted and left out, and a table where no
row has them is refused with the columns named.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from canestra.errors import InputError, NotAnOutput

__all__ = ["NEEDED", "PredictionRows", "predictions_folder", "read_predictions"]

# The columns the monitor reads (canestra.pipeline.predict writes them: PREDICTION_COLUMNS + MONITOR_COLUMNS).
NEEDED = ("image_id", "prediction", "family", "energy", "fruitness", "pca_head", "predicted_at")
_ANSWER = ("image_id", "prediction", "family")  # in every predictions table canestra ever wrote
UNKNOWN = "unknown"  # the prediction of an image answered unknown (answer.taxonomy.UNKNOWN)
_AGAIN = "predict the images again with this canestra (canestra predict, or canestra watch into a new --out)"


@dataclass
class PredictionRows:
    """The usable rows, in time order (``predicted_at``, then ``image_id`` within one run or batch)."""

    predicted_at: list[str]
    family: list[str]  # "" for unknown answers
    energy: np.ndarray
    fruitness: np.ndarray
    pca: np.ndarray  # (n, d)
    without_columns: int  # rows left out: written without the monitor's columns (an older canestra)
    files: int

    def __len__(self) -> int:
        return len(self.family)


def predictions_folder(path: str) -> str:
    """The predictions table folder of ``path``: ``OUT/predictions`` when given the run folder ``OUT``."""
    if "://" in path and not path.startswith("file://"):
        raise InputError(f"{path}: canestra monitor reads a local predictions folder; copy it here first "
                         "(e.g. aws s3 sync) and pass that folder")
    local = os.path.abspath(os.path.expanduser(path[len("file://"):] if path.startswith("file://") else path))
    if not os.path.isdir(local):
        raise InputError(f"predictions folder {local} does not exist: pass the --out folder of canestra predict or "
                         "canestra watch, or its predictions/ folder")
    inner = os.path.join(local, "predictions")
    return inner if os.path.isdir(inner) else local


def _parquet_files(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        # Spark's _temporary/, watch's hidden .tmp files, _SUCCESS and .crc files are not the table.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.endswith(".parquet") and not f.startswith((".", "_"))]
    return found


def read_predictions(path: str) -> PredictionRows:
    """The rows the monitor can score, in time order; InputError in plain words otherwise."""
    import pyarrow.parquet as pq

    folder = predictions_folder(path)
    files = _parquet_files(folder)
    if not files:
        # NotAnOutput: a folder canestra did not write gets no audit record written into it
        raise NotAnOutput(f"{folder} holds no predictions (no .parquet file): pass the --out folder of canestra "
                         "predict or canestra watch, or its predictions/ folder")
    at: list[str] = []
    fam: list[str] = []
    ids: list[str] = []
    en: list[np.ndarray] = []
    fr: list[np.ndarray] = []
    heads: list[list] = []
    without = 0
    missing: set[str] = set()
    for f in files:
        try:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            if not set(_ANSWER) <= names:
                raise NotAnOutput(f"{f} is not a canestra predictions file (no {', '.join(sorted(set(_ANSWER) - names))} "
                                 "column): pass the --out folder of canestra predict or canestra watch")
            absent = [c for c in NEEDED if c not in names]
            if absent:
                without += pf.metadata.num_rows
                missing.update(absent)
                continue
            t = pf.read(columns=list(NEEDED)).to_pydict()
        except InputError:
            raise
        except Exception as exc:  # truncated or foreign file: pyarrow says ArrowInvalid/OSError
            raise InputError(f"{f} is unreadable ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"
                             ": the predictions folder is damaged; predict again") from None
        for i in range(len(t["image_id"])):
            e, r, h, when = t["energy"][i], t["fruitness"][i], t["pca_head"][i], t["predicted_at"][i]
            if e is None or r is None or h is None or when is None:  # a row of an older run, kept by --incremental
                without += 1
                continue
            at.append(str(when))
            ids.append(str(t["image_id"][i]))
            pred = t["prediction"][i]
            fam.append("" if pred == UNKNOWN else str(t["family"][i] or ""))
            en.append(e)
            fr.append(r)
            heads.append(h)
    if not at:
        cols = ", ".join(c for c in NEEDED if c in missing) or "energy, fruitness, pca_head, predicted_at"
        raise InputError(f"the predictions in {folder} have no {cols} column(s) (or no value in them): they were "
                         f"written by a canestra without drift monitoring; {_AGAIN}")
    widths = {len(h) for h in heads}
    if len(widths) != 1:
        raise InputError(f"the predictions in {folder} mix rows with {sorted(widths)} PCA components: they come from "
                         "different models; monitor one model's predictions at a time")
    order = sorted(range(len(at)), key=lambda i: (at[i], ids[i]))
    return PredictionRows(
        predicted_at=[at[i] for i in order], family=[fam[i] for i in order],
        energy=np.asarray(en, dtype=np.float64)[order], fruitness=np.asarray(fr, dtype=np.float64)[order],
        pca=np.asarray(heads, dtype=np.float64)[order], without_columns=without, files=len(files))

"""``train --feedback STORE``: the feedback store's corrections as labelled training rows.

The store's two trees are added to the run's image roots, and their files to the listing the run
ingests (``pipeline.ingest.Listing``), labelled by their folder: ``family/Apple/…`` as the family-level
class ``"Apple (family)"`` (the label a family-level ``--images`` root gives), ``variety/<Class>/…`` as
that class. The level is the store's, never guessed from the folder names (``Banana`` is a family and
a Fruits-360 class). From there on they are images like any other: ingest reads only new files, the
feature store embeds only ids it lacks, so a retrain after +N corrections featurizes those N (and the
augmented views of the family-level ones).

An image corrected to several labels is trained with the newest; a label with a single image in the
whole run (a class needs two to split) waits in the store for more.
"""

from __future__ import annotations

import collections
import os
from typing import TYPE_CHECKING

from canestra.feedback import store
from canestra.storage import files as storage

if TYPE_CHECKING:
    from canestra.pipeline.ingest import Listing

__all__ = ["with_feedback"]


def with_feedback(uri: str, images: str | list[str], listing: Listing | None, taxonomy, unknown_images=(),
                  say=print, family_images=()) -> tuple[list[str], Listing, int, int]:
    """(the run's image roots with the store's, a ``Listing`` of them all, corrections trained on, corrections
    waiting for a second image of their label).

    ``listing``: the pre-checks' listing of ``images`` (made here when None or when it does not fit)."""
    from canestra.answer.taxonomy import family_label
    from canestra.pipeline.ingest import Listing, as_uris, listed

    root = store.require_store(uri)
    files, info = listed(listing, images, True, taxonomy, unknown_images, family_images)
    base_roots = [images] if isinstance(images, str) else list(images)
    stored = store.entries(root)
    newest: dict[str, tuple] = {}
    for e in stored:
        label = family_label(taxonomy.canonical_family(e.label) or e.label) if e.level == "family" else e.label
        if e.image_id not in newest or e.mtime > newest[e.image_id][0].mtime:
            newest[e.image_id] = (e, label)
    relabelled = len(stored) - len(newest)
    counts = collections.Counter(f.label for f in files if f.label is not None)
    counts.update(label for _, label in newest.values())
    kept = [(e, label) for e, label in newest.values() if counts[label] >= 2]
    waiting = len(newest) - len(kept)
    extra_roots, extra_info, extra_files = [], [], []
    for level in store.LEVELS:
        mine = [(e, label) for e, label in kept if e.level == level]
        if not mine:
            continue
        level_root = os.path.join(root, level) if not storage.is_remote(root) else f"{root}/{level}"
        extra_roots.append(level_root)
        extra_info.append({"uri": level_root, "level": level, "files": len(mine),
                           "folders": len({label for _, label in mine}), "feedback": True})
        extra_files += [storage.ListedFile(e.uri, label, e.size, e.mtime) for e, label in mine]
    say(f"canestra: feedback: {len(kept)} correction(s) from {storage.display(root)}"
        + (f"; {relabelled} older label(s) of re-corrected images left out" if relabelled else "")
        + (f"; {waiting} wait for more images of their label (a class needs 2)" if waiting else ""))
    roots = base_roots + extra_roots
    merged = Listing(tuple(roots), as_uris(unknown_images), taxonomy is not None, [*files, *extra_files],
                     [*info, *extra_info], as_uris(family_images))
    return roots, merged, len(kept), waiting

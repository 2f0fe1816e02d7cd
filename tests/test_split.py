"""Held-out frames are contiguous blocks per class: no near-duplicate neighbour leaks into test."""

from __future__ import annotations

import pytest

from canestra.errors import InputError
from canestra.pipeline.split import assign_splits, frame_number


def test_frame_number_from_fruits360_names():
    assert frame_number("123_100.jpg") == 123
    assert frame_number("r_45_100.jpg") == 45
    assert frame_number("r2_7_100.jpg") == 7
    assert frame_number("photo.jpg") is None


def _rows(n_classes=3, n=120):
    labels, names = [], []
    for c in range(n_classes):
        for f in range(n):
            labels.append(f"class{c}")
            names.append(f"{f * 3}_100.jpg")
    return labels, names


def test_split_is_stratified_seeded_and_contiguous():
    labels, names = _rows()
    a = assign_splits(labels, names, 0.2, seed=1)
    assert a == assign_splits(labels, names, 0.2, seed=1)
    assert a != assign_splits(labels, names, 0.2, seed=2)
    for c in range(3):
        frames = sorted(frame_number(n) for n, lb, s in zip(names, labels, a) if lb == f"class{c}" and s == "test")
        assert len(frames) == 24  # 2 blocks of 12 out of 120
        # two runs of consecutive frames (step 3), i.e. at most one gap
        gaps = sum(1 for x, y in zip(frames, frames[1:]) if y - x != 3)
        assert gaps <= 1


def test_most_test_frames_have_no_train_neighbour():
    labels, names = _rows(1)
    s = assign_splits(labels, names, 0.2, seed=3)
    by_frame = {frame_number(n): sp for n, sp in zip(names, s)}
    test = [f for f, sp in by_frame.items() if sp == "test"]
    touching = [f for f in test if by_frame.get(f - 3) == "train" or by_frame.get(f + 3) == "train"]
    assert len(touching) <= 4  # only block edges touch the train set


def test_tiny_and_invalid_inputs():
    assert sorted(assign_splits(["a", "a", "b", "b"], ["1.jpg", "2.jpg", "1.jpg", "2.jpg"], 0.5, 0)) == [
        "test", "test", "train", "train"]
    with pytest.raises(InputError, match="at least 2 images"):
        assign_splits(["a", "b", "b"], ["1.jpg", "1.jpg", "2.jpg"])
    with pytest.raises(InputError, match="between 0 and 1"):
        assign_splits(["a", "a"], ["1", "2"], 1.5)

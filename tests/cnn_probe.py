"""A fixture that counts the rows handed to the CNN, for tests proving work was (not) redone.

Not a test module: ``from cnn_probe import cnn_rows`` makes the fixture available. Every
embedding goes through ``ImageFeaturizer._transform`` on the driver, so counting there sees
every CNN pass, whichever executor process later runs it.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def cnn_rows(monkeypatch) -> list[int]:
    from canestra.vision.featurizer import ImageFeaturizer

    calls: list[int] = []
    real = ImageFeaturizer._transform

    def counting(self, dataset):
        calls.append(dataset.count())
        return real(self, dataset)

    monkeypatch.setattr(ImageFeaturizer, "_transform", counting)
    return calls

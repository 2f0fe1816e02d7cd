"""Stable import path of the featurizer stage.

Models saved by canestra 0.1.0 name ``canestra.featurizer.ImageFeaturizer`` in their metadata, and
users import it from here in their own Spark ML pipelines; the code lives in canestra.vision.
"""

from canestra.vision.featurizer import ImageFeaturizer

__all__ = ["ImageFeaturizer"]

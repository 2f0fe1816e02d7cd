"""Images in, features out: decoding/cleaning, the pretrained CNN backbone, its weights, the Spark featurizer stage."""

# The modules other packages import; scenes is a hook for the benches (bench/cross_source.py).
__all__ = ["backbone", "featurizer", "images", "scenes", "views", "weights"]

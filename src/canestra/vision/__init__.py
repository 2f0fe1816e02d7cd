"""Images in, features out: decoding/cleaning, the pretrained CNN backbone, its weights, the Spark featurizer stage."""

"""canestra: fruit-image classification on Apache Spark.

Library first: ``canestra.training.train``, ``canestra.prediction.predict``,
``canestra.catalog.ingest``; the CLI (``canestra <command>``) is a thin layer.
"""

__version__ = "0.1.0"

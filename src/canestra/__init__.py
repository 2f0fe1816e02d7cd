"""canestra: fruit-image classification on Apache Spark.

Library first: ``canestra.pipeline.train.train``, ``canestra.pipeline.predict.predict``,
``canestra.pipeline.ingest.ingest``; the CLI (``canestra <command>``) is a thin layer.
"""

__version__ = "0.1.0"

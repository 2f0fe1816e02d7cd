"""Drift monitoring without Spark: a model's held-out answers in summary (its drift reference), and
windows of new answers scored against it (``canestra monitor``, ``canestra serve``'s ``GET /v1/drift``).

``stats``: the statistics, their scores and the bootstrap calibration of their thresholds;
``table``: the predictions table read with pyarrow; ``monitor``: windows in time order and the
report object; ``report``: the HTML page. ``canestra.pipeline.reference`` builds the reference at
training time (it needs Spark for the held-out rows' PCA projection).
"""

__all__ = ["monitor", "report", "stats", "table"]

"""The batch data flow: ingest -> split -> train -> predict/evaluate, with metrics and the HTML report."""

# The modules other packages import (pca is the pipeline's own); evaluation and split are hooks for the benches.
__all__ = ["eval_sources", "evaluation", "features", "ingest", "metrics", "predict", "report", "split", "train",
           "watch"]

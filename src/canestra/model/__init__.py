"""The saved model folder: its format, and the one check predict, evaluate and serve share.

Spark-free (plain files: JSON lines and Parquet footers), so the HTTP service and the GDPR tools
read a model folder without a JVM; ``canestra.pipeline`` writes it.
"""

from canestra.model.folder import (
    DRIFT_REFERENCE,
    MODEL_FORMAT,
    check_model_dir,
    model_info,
    read_drift_reference,
    read_training_ids,
    write_drift_reference,
    write_model_info,
    write_training_ids,
)

__all__ = ["DRIFT_REFERENCE", "MODEL_FORMAT", "check_model_dir", "model_info", "read_drift_reference",
           "read_training_ids", "write_drift_reference", "write_model_info", "write_training_ids"]

"""AnswerModel: the last stage of a trained PipelineModel (Spark side of ``answer.decide``).

Reads the CNN embedding, the classifier's margins and probabilities (mixed with the answer head's, where the
model has one: ``answer.rule.answer_probabilities``), and adds
``predicted_label`` (a variety or ``unknown``), ``predicted_probability``, ``family``,
``family_probability``, ``energy``, ``fruitness`` and ``top5`` (JSON). Its whole
decision rule is one JSON Param, so the saved model carries it and the online
predictor reads it without Spark.
"""

# No `from __future__ import annotations`: Spark reads the UDF's type hints at run time.
import json

import pandas as pd
from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable

from canestra.answer.rule import AnswerRule, answer_probabilities, decide

OUTPUT_SCHEMA = ("predicted_label string, predicted_probability double, family string, family_probability double, "
                 "energy double, fruitness double, top5 string")


class AnswerModel(Transformer, DefaultParamsReadable, DefaultParamsWritable):
    rule = Param(Params._dummy(), "rule", "the decision rule as JSON (labels, families, unknown thresholds)",
                 TypeConverters.toString)
    featuresCol = Param(Params._dummy(), "featuresCol", "CNN embedding column", TypeConverters.toString)
    rawPredictionCol = Param(Params._dummy(), "rawPredictionCol", "classifier margins column", TypeConverters.toString)
    probabilityCol = Param(Params._dummy(), "probabilityCol", "class probabilities column", TypeConverters.toString)
    headProbabilityCol = Param(Params._dummy(), "headProbabilityCol", "the answer head's class probabilities "
                               "column, mixed in by the rule's head_weight; empty = none", TypeConverters.toString)

    @keyword_only
    def __init__(self, *, rule: str = "", featuresCol: str = "features", rawPredictionCol: str = "rawPrediction",
                 probabilityCol: str = "probability", headProbabilityCol: str = ""):
        super().__init__()
        self._setDefault(rule="", featuresCol="features", rawPredictionCol="rawPrediction",
                         probabilityCol="probability", headProbabilityCol="")
        self._set(**self._input_kwargs)  # type: ignore[attr-defined]  # set by @keyword_only

    def getRule(self) -> AnswerRule:
        return AnswerRule.from_json(self.getOrDefault(self.rule))

    def labels(self) -> list[str]:
        return list(self.getRule().labels)

    def _transform(self, dataset):
        from pyspark.ml.functions import vector_to_array
        from pyspark.sql import functions as F

        rule = self.getRule()  # parsed once here; the UDF closure ships it to the workers
        head_col = self.getOrDefault(self.headProbabilityCol)

        @F.pandas_udf(OUTPUT_SCHEMA)
        def answer(probs: pd.Series, margins: pd.Series, feats: pd.Series, head: pd.Series) -> pd.DataFrame:
            import numpy as np

            if not len(probs):
                return pd.DataFrame({c.split()[0]: [] for c in OUTPUT_SCHEMA.split(", ")})
            p = answer_probabilities(np.stack(probs.to_numpy()),
                                     np.stack(head.to_numpy()) if head_col else None, rule)
            a = decide(p, np.stack(margins.to_numpy()), np.stack(feats.to_numpy()), rule)
            return pd.DataFrame({
                "predicted_label": a.prediction, "predicted_probability": a.probability, "family": a.family,
                "family_probability": a.family_probability, "energy": a.energy, "fruitness": a.fruitness,
                "top5": [json.dumps(t) for t in a.top5],
            })

        col = answer(vector_to_array(F.col(self.getOrDefault(self.probabilityCol))),
                     vector_to_array(F.col(self.getOrDefault(self.rawPredictionCol))),
                     vector_to_array(F.col(self.getOrDefault(self.featuresCol)), "float32"),
                     vector_to_array(F.col(head_col)) if head_col else F.lit(None).cast("array<double>"))
        out = dataset.withColumn("_answer", col)
        for name in ("predicted_label", "predicted_probability", "family", "family_probability", "energy",
                     "fruitness", "top5"):
            out = out.withColumn(name, F.col("_answer." + name))
        return out.drop("_answer")

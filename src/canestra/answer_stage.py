"""Import path kept for models saved by canestra 0.1.0, whose metadata names
``canestra.answer_stage.AnswerModel``; the stage lives in canestra.answer.stage."""

from canestra.answer.stage import AnswerModel

__all__ = ["AnswerModel"]

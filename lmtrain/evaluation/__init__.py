"""A model and a text -> perplexities: batched evaluation (evaluate), one stream scored token by
token (stream), dynamic evaluation (dynamic), the continuous cache (cache), `lmtrain evaluate`
as one function (run.evaluate_run), and the log-probabilities of lines and texts (score).

This is the stage's face: other stages import from `lmtrain.evaluation` only."""

from lmtrain.evaluation.dynamic import DynamicEval, DynamicSettings, gradient_stats
from lmtrain.evaluation.evaluate import (
    CacheSettings,
    combine,
    evaluate,
    evaluate_stream,
    total_nll,
    tune_cache,
)
from lmtrain.evaluation.run import SPLITS, Evaluation, EvaluateSettings, evaluate_run
from lmtrain.evaluation.score import BATCH_LINES, Scored, score_lines, score_texts, sequence_log_probs

__all__ = [
    "SPLITS", "Evaluation", "EvaluateSettings", "evaluate_run",
    "CacheSettings", "DynamicEval", "DynamicSettings", "combine", "evaluate", "evaluate_stream",
    "gradient_stats", "total_nll", "tune_cache", "BATCH_LINES", "Scored", "score_lines", "score_texts",
    "sequence_log_probs"
]

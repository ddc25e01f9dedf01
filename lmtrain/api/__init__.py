"""lmtrain from Python: load a trained model and score or sample with it (model), train and
evaluate runs (run), with the CLI's numbers, quiet unless asked, LmtrainError instead of exits.

    import lmtrain
    lm = lmtrain.load("runs/ptb")                    # -> TrainedModel
    lm.perplexity("the company said it would"); lm.score(["a b", "c d"]); lm.generate("the", seed=1)
    run = lmtrain.train("corpus/", overrides={"train.max_steps": 100}, run_dir="runs/x")   # -> TrainedRun
    lmtrain.evaluate(run)                            # the report `lmtrain evaluate --json` prints

The package's own face (`lmtrain/__init__.py`) offers these names, importing this stage only when
one is first used. It sits on the floor below the CLI: it calls the stages as the CLI does and
never the CLI, which exits.

This is the stage's face: other stages import from `lmtrain.api` only."""

from lmtrain.api.model import LmtrainWarning, TrainedModel, load
from lmtrain.api.run import TrainedRun, evaluate, train
from lmtrain.errors import LmtrainError
from lmtrain.evaluation import CacheSettings, DynamicSettings, Scored

__all__ = [
    "CacheSettings", "DynamicSettings", "LmtrainError", "LmtrainWarning", "Scored", "TrainedModel", "TrainedRun",
    "evaluate", "load", "train"
]

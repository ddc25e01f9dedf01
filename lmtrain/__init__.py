"""lmtrain: train, evaluate, score and sample recurrent language models, from the command line
(`lmtrain --help`) or from Python (docs/api.md):

    import lmtrain
    lm = lmtrain.load("runs/ptb")
    lm.perplexity("the company said it would")

The Python API (lmtrain.api) is imported when one of its names is first used, so the command line
and `import lmtrain.cli` pay nothing for it."""

from lmtrain.errors import LmtrainError

__version__ = "0.1.0"
API = ("CacheSettings", "DynamicSettings", "LmtrainWarning", "Scored", "TrainedModel", "TrainedRun", "evaluate",
       "load", "train")
__all__ = ["LmtrainError", "__version__", *API]


def __getattr__(name: str):
    if name in API:
        from lmtrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'lmtrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *API})

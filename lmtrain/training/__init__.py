"""A corpus and a config -> a trained run: set-up (setup), the config made concrete and sized to a
time budget (autosize), the loop (loop), resume (resume,
payload_resume), fine-tuning a trained run on new text (finetune), checks before the first step
(preflight), several processes (distributed, rendezvous), signals and CUDA graphs.

This is the stage's face: other stages import from `lmtrain.training` only."""

from lmtrain.training.autosize import Plan
from lmtrain.training.finetune import SHAPE_KEYS, finetune_config
from lmtrain.training.graphs import WindowRunner
from lmtrain.training.loop import train
from lmtrain.training.setup import default_run_dir, prepare_run, resume_run, start_run
from lmtrain.training.signals import InterruptSignals, StopSignals

# `distributed` is offered as a module (the CLI's train command: sessions, ranks, launching); it is
# imported where it is used, `from lmtrain.training import distributed`
__all__ = [
    "InterruptSignals", "Plan", "SHAPE_KEYS", "StopSignals", "WindowRunner", "default_run_dir", "distributed", "finetune_config", "prepare_run", "resume_run", "start_run", "train"
]

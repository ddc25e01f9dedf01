"""A trained model -> text: the sampler (sampler), the per-token step (stepper) and many samples
streamed in order (samples).

This is the stage's face: other stages import from `lmtrain.generation` only."""

from lmtrain.generation.sampler import SampleSettings, Sampler, StreamRandom
from lmtrain.generation.samples import (
    check_seed,
    draw_samples,
    draw_turn,
    utf8_text,
    write_jsonl,
    write_text,
)
from lmtrain.generation.stepper import WEIGHT_PRECISIONS, Stepper, available_precisions, resolve_precision

__all__ = [
    "WEIGHT_PRECISIONS", "SampleSettings", "Sampler", "Stepper", "StreamRandom", "available_precisions",
    "check_seed", "draw_samples", "draw_turn", "resolve_precision", "utf8_text", "write_jsonl", "write_text"
]

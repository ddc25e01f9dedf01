"""Not on any training or inference path: benchmarks (bench, bench_encode), cell comparison
(compare), the synthetic copy task (synth), reproductions (reproduce), reports (report) and the
generated configuration reference (config_docs).

This is the stage's face: other stages import from `lmtrain.tools` only."""

from lmtrain.tools.bench_generate import GenerationBench, format_generation_table, measure_generation
from lmtrain.tools.report import write_report
from lmtrain.tools.reproduce import reproduce, results_table
from lmtrain.tools.synth import (
    DEFAULT_ALPHABET,
    DEFAULT_K,
    memoryless_perplexity,
    optimum_perplexity,
    write_copy_corpus,
)

# `bench` and `doctor` are offered as modules (the CLI's commands: settings, presets, reports),
# `from lmtrain.tools import bench, doctor`
__all__ = [
    "bench", "bench_loop", "doctor", "GenerationBench", "format_generation_table", "measure_generation",
    "DEFAULT_ALPHABET", "DEFAULT_K", "memoryless_perplexity", "optimum_perplexity", "reproduce",
    "results_table", "write_copy_corpus", "write_report"
]

#!/usr/bin/env bash
# The same seeded runs through one checkout, for comparing two checkouts byte for byte (issue 16's
# evidence that a restructuring changed no number):
#   benchmarks/same_numbers.sh CHECKOUT OUT [DATA]
# trains configs/demo.toml for 60 steps (a record every 5) on the built-in corpus and configs/ptb-small.toml for 200
# steps (every 10) on DATA/ptb (default ../shared/data), then writes each run's metrics.jsonl, `evaluate
# --json` on its test split and `generate --seed 1` under OUT; and a GRU on the demo config for 30 steps
# (the LSTM runs its own sequence kernel, the GRU the generic engine). Compare two OUTs with
#   for r in demo ptb gru; do for f in $r/metrics.jsonl $r.eval.json $r.gen.txt; do cmp A/$f B/$f; done; done
set -euo pipefail
checkout=$(cd "$1" && pwd); mkdir -p "$2"; out=$(cd "$2" && pwd); data=${3:-$checkout/../shared/data}
python=${PYTHON:-$checkout/.venv/bin/python}
export PYTHONPATH="$checkout" LMTRAIN_CACHE="$out/cache" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$checkout/build/torch_extensions}
lmtrain() { (cd "$checkout" && "$python" -m lmtrain "$@"); }
run() {  # NAME CORPUS-ARGS... -- TRAIN-ARGS...
  local name=$1; shift
  lmtrain train "$@" --run-dir "$out/$name" --force > "$out/$name.train.log" 2>&1
  lmtrain evaluate "$out/$name" --split test --json > "$out/$name.eval.json"
  lmtrain generate "$out/$name" --prompt "The" --max-tokens 60 --num-samples 3 --seed 1 > "$out/$name.gen.txt"
}
run demo --config configs/demo.toml --set train.max_steps=60 --set train.log_interval=5
run ptb "$data/ptb" --config configs/ptb-small.toml --set train.max_steps=200 --set train.log_interval=10
run gru --config configs/demo.toml --set model.cell=gru --set train.max_steps=30 --set train.log_interval=5  # the generic engine
echo "wrote $out"

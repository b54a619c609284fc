#!/bin/bash
# The demo bundle's training run on a lent GPU host (no registry there; the image's torch,
# transformers and peft run train_bundle.py as is): natural vs word_punct at the shipped
# hyper-parameters, plus two word_punct variants, trained concurrently on one H200, each
# evaluated on the whole validation split at the end. stage.sh (here, on a machine with the
# demo model) writes .gpu/t14/: the model in xz parts p0..p2 (one `run` call each, back to back:
#   mkdir -p /tmp/t14/parts && cp .gpu/t14/pN/part0N /tmp/t14/parts/     carry [".gpu/t14/pN"])
# then main/ with the last part, the model's small files, the data and the code:
#   bash .gpu/t14/main/train_host.sh      carry [".gpu/t14/main"], timeout 600 ($OUT set)
# Each config comes back as $OUT/NAME.tar (bundle + log). A CPU dry run, parts in /tmp/t14/parts:
#   OUT=dir PY=.venv/bin/python SMOKE="--max-train 48 --max-steps 3 --max-val 12 --device cpu" \
#     bash .gpu/t14/main/train_host.sh
set -u
S=$(cd "$(dirname "$0")" && pwd)
T=/tmp/t14
PY=${PY:-python3}
SMOKE=${SMOKE:-}  # e.g. "--max-train 64 --max-steps 3 --max-val 16 --device cpu" for a dry run on a CPU
START=$(date +%s)
mkdir -p "$T/parts" "$T/model" "$T/out"
exec > >(tee "$OUT/run.log") 2>&1
echo "start $(date -u +%FT%TZ) host $(hostname) nproc $(nproc)"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
$PY -c 'import sys, torch, transformers, peft, safetensors; print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__, safetensors.__version__)'

cp "$S"/part0* "$T/parts/"  # the last part travels with this call
(cd "$T/parts" && sha256sum -c "$S/PARTS.sha256") || exit 3
cat $(awk '{print "'"$T"'/parts/" $2}' "$S/PARTS.sha256") > "$T/model.safetensors.xz"
(cd "$T" && sha256sum -c "$S/SHA256SUMS") || exit 3
$PY -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"), 1 << 22)' \
  "$T/model.safetensors.xz" "$T/model/model.safetensors" || exit 3
cp "$S"/model_files/* "$T/model/"
rm -rf "$T/code" && cp -r "$S/code" "$T/code"
echo "model ready after $(( $(date +%s) - START )) s"

COMMON=(--model "$T/model" --data "$S/data" --batch-size 16 --precision bf16 --seed 1234 --head-lr 1e-3
        --eval-every-epoch --deadline-s 500 --threads 3 --name xlam-smollm2-135m-v2 --bundle-version 2.0.0
        --where "NVIDIA H200 (4 configs sharing the one GPU, 16 CPU cores)")
declare -A CFG=(
  [a_natural]="--utterance-segmentation natural --lr 5e-4 --epochs 3"
  [b_wordpunct]="--utterance-segmentation word_punct --lr 5e-4 --epochs 3"
  [c_wordpunct_ep3.5]="--utterance-segmentation word_punct --lr 5e-4 --epochs 3.5"
  [d_wordpunct_lr1e-3]="--utterance-segmentation word_punct --lr 1e-3 --epochs 3"
)
NAMES=(a_natural b_wordpunct c_wordpunct_ep3.5 d_wordpunct_lr1e-3)
# If anything hangs, bring the logs back before the 600 s limit.
# (1 s sleeps: a killed watchdog leaves no long sleep holding the output open.)
( for _ in $(seq 565); do sleep 1; done; tar -C "$T/out" -cf "$OUT/partial.tar" . 2>/dev/null
  echo "watchdog: partial.tar written" ) &
WATCHDOG=$!
for n in "${NAMES[@]}"; do
  mkdir -p "$T/out/$n"
  # shellcheck disable=SC2086
  ( cd "$T/code" && PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false $PY scripts/train_bundle.py \
      "${COMMON[@]}" ${CFG[$n]} $SMOKE --out "$T/out/$n/bundle" >"$T/out/$n/train.log" 2>&1
    echo "rc=$? at $(( $(date +%s) - START )) s" >>"$T/out/$n/train.log"
    tar -C "$T/out" -cf "$OUT/$n.tar" "$n" ) &
done
while [ "$(jobs -rp | grep -vc "^$WATCHDOG\$")" -gt 0 ]; do
  sleep 30
  echo "--- $(( $(date +%s) - START )) s"
  for n in "${NAMES[@]}"; do echo "$n: $(grep -E '^step|^epoch|^validation|^rc=' "$T/out/$n/train.log" | tail -1)"; done
done
kill "$WATCHDOG" 2>/dev/null
echo "=== done after $(( $(date +%s) - START )) s"
for n in "${NAMES[@]}"; do
  echo "### $n"; grep -E 'ceiling|^device=|^epoch|^validation|^bundle written|^rc=|Error|error' "$T/out/$n/train.log" | tail -12
done
ls -la "$OUT"

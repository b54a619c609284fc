#!/usr/bin/env bash
# Stage the demo bundle's GPU training run (train_host.sh) into .gpu/t14/ of this checkout (ignored
# by git; the device tool carries it): the converted demo model compressed and cut into parts of
# at most 50 MiB (a call carries at most 64 MiB), checksums, the data and the code it runs.
#   bash scripts/train_gpu/stage.sh [MODEL_DIR]      # default: .cache/models/smollm2-135m-instruct
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-.cache/models/smollm2-135m-instruct}
stage=.gpu/t14
rm -rf "$stage" && mkdir -p "$stage/main/model_files" "$stage/main/data" "$stage/main/code/scripts" \
  "$stage/main/code/server/probeserve/core"
tmp=$(mktemp -d)
xz -T0 -6 -k -c "$model/model.safetensors" > "$tmp/model.safetensors.xz"
(cd "$tmp" && sha256sum model.safetensors.xz > SHA256SUMS && split -b 50M -d -a 2 model.safetensors.xz part \
  && sha256sum part0* > PARTS.sha256)
mv "$tmp/SHA256SUMS" "$tmp/PARTS.sha256" "$stage/main/"
parts=("$tmp"/part0*)
last=${parts[-1]}
for part in "${parts[@]}"; do
  if [ "$part" = "$last" ]; then mv "$part" "$stage/main/"; else
    n=$(basename "$part"); mkdir -p "$stage/p${n#part0}"; mv "$part" "$stage/p${n#part0}/"; fi
done
find "$model" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} "$stage/main/model_files/" \;
cp ../shared/data/xlam/train.jsonl ../shared/data/xlam/function_schemas.json "$stage/main/data/"
cp scripts/train_bundle.py scripts/xlam_data.py scripts/demo_model.py "$stage/main/code/scripts/"
cp server/probeserve/__init__.py "$stage/main/code/server/probeserve/"
cp server/probeserve/core/{__init__,spans,segmentation,checkpoint,errors}.py "$stage/main/code/server/probeserve/core/"
cp scripts/train_gpu/train_host.sh "$stage/main/"
rm -rf "$tmp"
du -sh "$stage"/*

#!/usr/bin/env bash
# On the GPU host, after the parts are in /tmp/parts: install vLLM and the app wheels, then run
# scripts/bench/gpu_bench.py on CONFIGS, starting no configuration after BUDGET_S seconds of it.
#
#   bash scripts/bench/gpu/bench_host.sh OUT BUDGET_S [CONFIGS]      # carrying .gpu/parts/p15 and .gpu/app
#
# A later call on the same (still warm) machine finds vLLM installed and only runs the bench, so
# configurations can be split over calls of at most 10 minutes. GPU_BENCH_ARGS adds arguments.
#
# Output: OUT/gpu_bench.{json,md}, OUT/gpu_bench_logs.txt and OUT/host.log (this script's output).
set -uo pipefail
out=${1:?usage: bench_host.sh OUT BUDGET_S [CONFIGS]}; budget=${2:?}; configs=${3:-fp16-base,awq-lora,fp16-lora,awq-base}
mkdir -p "$out"
{
  for p in .gpu/parts/p*/; do cp "$p"* /tmp/parts/ 2>/dev/null; done  # the part carried with this call
  bash scripts/bench/gpu/install_host.sh /tmp/parts .gpu/app || exit 1
  export PYTHONPATH=/tmp/site:$PWD/server:$PWD/clients/python HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1
  python3 scripts/bench/gpu_bench.py --out "$out" --root /tmp/gb --configs "$configs" --budget-s "$budget" ${GPU_BENCH_ARGS:-}
} 2>&1 | tee "$out/host.log"

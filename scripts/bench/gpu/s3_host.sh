#!/usr/bin/env bash
# The third GPU session of 2026-11-30 on a lent nvidia-h200-x2 (2 H200s, 32 cores), for issues 15
# and 16, as it was made. The vLLM 0.26.0 site travels as in parts.sh; .gpu/s3/main is a copy of
# server/, clients/python/ and scripts/ (this script among them):
#   call 0:    carry .gpu/t16/boot .gpu/t16/p00 .gpu/s3/main:  bash .gpu/s3/main/scripts/bench/gpu/s3_host.sh recv 00
#   calls 1-6: carry .gpu/t16/pNN:                            bash /tmp/code/scripts/bench/gpu/s3_host.sh part NN
#   call 7:    carry .gpu/t16/p07:                            PHASES=... bash /tmp/code/scripts/bench/gpu/s3_host.sh run 07
# Calls go back to back: the host and its /tmp go back 30 s after a call. As run on 2026-11-30,
# four installs, each ending in one call 7 (BENCHMARKS.md "How the third session's figures were
# made"): PHASES=A; PHASES=A0,B,C; PHASES=A RUN=_r2 PROFILE_N=0 DEADLINE_S=420; PHASES=A1
# RUN=_spec BB_ARGS="--specialize-active-lora -n 120" DEADLINE_S=400.
# The fourth session (same day, one install): PHASES=W,A1,S0 RUN=_s4 BB_ARGS="--specialize-active-lora
# -n 120" DEADLINE_S=560: two bundles runs at once, one per GPU, after the wake-up latencies; the
# same with PHASES=A1,S0 RUN=_s4b; then, on a second install, with the servers' new default (no
# flag) and the one/two/eight servers: PHASES=A1,S0 RUN=_s4c BB_ARGS="-n 120" DEADLINE_S=560; then, on a
# third install, PHASES=I DEADLINE_S=300.
# Phases (PHASES, default A):
#   W: wake_latency.py alone on the idle host first (what waking the transport's threads costs here);
#   I: idle_exp.py on each GPU at once (a step after an idle spell: the CPU's or the GPU's idling);
#   A, both GPUs apart (CUDA_VISIBLE_DEVICES, cores 0-15 / 16-31), or either lane alone:
#      A0, GPU 0: fp16-base (8B, TP=1) through gpu_bench.py, then 1600 calls at c8 under py-spy;
#      A1, GPU 1: bundles_bench.py: the one-bundle, one-bundle --max-loras 8 and eight-bundle servers.
#      S0, GPU 0: bundles_bench.py as A1 (instead of A0): a second run of it in the same call.
#   B: fp16-70b-tp2 (70B FP16 over both GPUs);  C: fp16-tp2 (8B over both GPUs).
# B and C run only under the multicast guard (mcguard/sitecustomize.py, first on PYTHONPATH in
# every process), with vLLM's all-reduce fusions off, and only after checks on this host: torch
# honours TORCH_SYMM_MEM_DISABLE_MULTICAST, and the guard blocks what it must. Their logs are then
# searched for what must and must not be there (mcguard_verdict below).
# A watchdog saves results and logs to $OUT before the call's 600 s run out.
set -u
phase=${1:?recv|part|run}; part=${2:-}
t0=$(date +%s)
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=parts.sh
. "$here/parts.sh"
case $phase in
recv)
  start_recv "$part"
  rm -rf /tmp/code && cp -r .gpu/s3/main /tmp/code
  for shape in 8b 70b; do  # torch, safetensors and tokenizers are the image's
    extra=""; [ $shape = 8b ] && extra="--bundles 8"
    setsid nohup python3 /tmp/code/scripts/bench/gpu/make_bundle.py /tmp/gb --shape $shape $extra \
      >/tmp/mb_$shape.log 2>&1 </dev/null &
  done
  nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader
  nproc; sleep 2; cat /tmp/recv.log
  exit 0 ;;
part)
  put_part "$part"; sleep 1; cat /tmp/recv.log /tmp/mb_*.log; exit 0 ;;
run) ;;
*) echo "unknown phase $phase"; exit 2 ;;
esac

PHASES=${PHASES:-A}
exec > >(tee -a "$OUT/s3_${PHASES//,/}.log") 2>&1
[ -n "$part" ] && put_part "$part"
wait_site || exit 3
for _ in $(seq 120); do [ -f /tmp/gb/bundle/bundle.json ] && [ -f /tmp/gb/bundle70b/bundle.json ] \
  && [ -f /tmp/gb/bundles/b7/bundle.json ] && break; sleep 1; done
cat /tmp/mb_*.log
cd /tmp/code || exit 3
export PYTHONPATH=/tmp/site:/tmp/code/server:/tmp/code/clients/python HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
  PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0
B=scripts/bench
R=/tmp/r3
mkdir -p $R
python3 -c 'import vllm, torch, grpc; print("vllm", vllm.__version__, "torch", torch.__version__, "grpc", grpc.__version__)'
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
echo "ready after $(( $(date +%s) - t0 )) s"
deadline=$(( t0 + ${DEADLINE_S:-560} ))
left() { echo $(( deadline - $(date +%s) )); }
save() {
  tar -czf "$OUT/results_${PHASES//,/}.tgz" -C /tmp r3 2>/dev/null
  tar -czf "$OUT/logs_${PHASES//,/}.tgz" /tmp/gpu_bench_*.log /tmp/lane_*.log 2>/dev/null
}
( while [ "$(left)" -gt 0 ]; do sleep 1; done; save; echo "watchdog: results and logs saved" ) &
watchdog=$!
phase_end() {  # by group: engine workers (TP) and servers go with their bench
  kill -- -"$1" 2>/dev/null; sleep 2; kill -9 -- -"$1" 2>/dev/null
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader
}

lane() {  # NAME: whether PHASES asks for it (A means both A0 and A1)
  [[ ,$PHASES, == *,$1,* ]] || { [[ $1 == A? ]] && [[ ,$PHASES, == *,A,* ]]; }
}
bundles_lane() {  # GPU CORES NAME: bundles_bench.py on one GPU, in the background
  CUDA_VISIBLE_DEVICES=$1 setsid taskset -c "$2" python3 $B/bundles_bench.py --root /tmp/gb --out "$R/$3${RUN:-}" \
    --precision fp16 -n 160 --rounds 3 --gpu-memory-utilization 0.28 --startup-timeout-s 240 ${BB_ARGS:-} \
    > "/tmp/lane_$3.log" 2>&1 &
}
if [[ ,$PHASES, == *,W,* ]]; then
  echo "=== W after $(( $(date +%s) - t0 )) s, $(left) s left"
  taskset -c 0-15 python3 $B/wake_latency.py --n 300 --gaps-ms 0,1,3,10 --wait-ms 8 > $R/wake_latency.json
  cat $R/wake_latency.json
fi
if [[ ,$PHASES, == *,I,* ]]; then
  echo "=== I after $(( $(date +%s) - t0 )) s, $(left) s left"
  pids=()
  for g in 0 1; do
    CUDA_VISIBLE_DEVICES=$g setsid taskset -c $(( 16 * g ))-$(( 16 * g + 15 )) timeout $(( $(left) - 15 )) \
      python3 $B/gpu/idle_exp.py --model /tmp/gb/llama8b --out "$R/idle_gpu$g" > "/tmp/lane_i$g.log" 2>&1 &
    pids+=($!)
  done
  # these two only: a bare `wait` also waits for the watchdog (as run on 2026-11-30, which cost the
  # call its remaining time after both had finished)
  wait "${pids[@]}"; cp /tmp/lane_i*.log $R/; tail -n 2 /tmp/lane_i*.log
fi
if lane A0 || lane A1 || lane S0; then
  echo "=== A after $(( $(date +%s) - t0 )) s, $(left) s left"
  mkdir -p /tmp/pyspy && python3 -m zipfile -e /tmp/t16boot/py_spy-*.whl /tmp/pyspy
  PYSPY=$(ls /tmp/pyspy/py_spy-*.data/scripts/py-spy); chmod +x "$PYSPY"
  pids=()
  if lane A0; then
    CUDA_VISIBLE_DEVICES=0 setsid taskset -c 0-15 python3 $B/gpu_bench.py --out "$R/a0_fp16${RUN:-}" --root /tmp/gb \
      --configs fp16-base -n 120 --rounds 3 --profile-n "${PROFILE_N:-1600}" --py-spy "$PYSPY" --client-procs \
      --timeout-s 300 \
      > /tmp/lane_a0.log 2>&1 &
    pids+=($!)
  fi
  if lane A1; then bundles_lane 1 16-31 a1_bundles; pids+=($!); fi
  if lane S0; then bundles_lane 0 0-15 s0_bundles; pids+=($!); fi
  for pid in "${pids[@]}"; do wait "$pid"; echo "lane $pid exited $? after $(( $(date +%s) - t0 )) s"; done
  cp /tmp/lane_a*.log /tmp/lane_s*.log $R/ 2>/dev/null
  for pid in "${pids[@]}"; do phase_end "$pid"; done
  tail -n 25 /tmp/lane_a*.log /tmp/lane_s*.log 2>/dev/null
fi

guard_ready() {  # the TP=2 phases' preconditions, each checked here, on this host; nothing is called
  local lib
  lib=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
  if ! grep -l TORCH_SYMM_MEM_DISABLE_MULTICAST "$lib"/*.so; then
    echo "mcguard: no library under $lib reads TORCH_SYMM_MEM_DISABLE_MULTICAST"; return 1
  fi
  PYTHONPATH=/tmp/code/scripts/bench/gpu/mcguard:$PYTHONPATH MCGUARD_VERBOSE=1 python3 - <<'PY' || return 1
import os

import torch.distributed._symmetric_memory as symm
from torch._C._distributed_c10d import _SymmetricMemory

for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
             "VLLM_ALLREDUCE_USE_SYMM_MEM", "VLLM_FLASHINFER_ALLREDUCE_BACKEND"):
    print("mcguard env", name, os.environ.get(name))
entries = {"symm.empty": symm.empty, "symm.rendezvous": symm.rendezvous,
           "_SymmetricMemory.rendezvous": _SymmetricMemory.rendezvous}
try:
    from cuda.bindings import driver
    entries["cuMulticastCreate"] = driver.cuMulticastCreate
except ImportError:
    print("mcguard: no cuda.bindings here")
import flashinfer.comm as comm
entries["flashinfer create_allreduce_fusion_workspace"] = comm.create_allreduce_fusion_workspace
from vllm.config import vllm as config
passes = config.OPTIMIZATION_LEVEL_02["compilation_config"]["pass_config"]
print("mcguard O2 pass_config", passes)
open_ = [name for name, fn in entries.items() if not getattr(fn, "__name__", "").startswith("mcguard_blocked")]
assert not open_, f"not blocked: {open_}"
assert passes.get("fuse_allreduce_rms") is False, passes
print("mcguard: ready,", len(entries), "entries blocked")
PY
}

mcguard_verdict() {  # LOG: what a TP=2 start-up must and must not have said
  local log=$1
  echo "--- mcguard verdict for $log"
  grep -c "\[mcguard\] installed" "$log" | sed 's/^/processes with the guard: /'
  grep -m3 "all-reduce backends" "$log"
  for bad in "allreduce backend: mnnvl" "backend=mnnvl" "FlashInfer Allreduce norm fusion workspace" \
      "SymmMemCommunicator" "\[mcguard\] blocked"; do
    n=$(grep -c "$bad" "$log"); echo "must be absent: '$bad' x$n"
  done
}

if [[ ,$PHASES, == *,B,* || ,$PHASES, == *,C,* ]]; then
  if ! guard_ready; then
    echo "TP=2 phases not run: the multicast guard is not ready on this host"
    PHASES=${PHASES//B/}; PHASES=${PHASES//C/}
  fi
fi
TP2_ENV=(env "PYTHONPATH=/tmp/code/scripts/bench/gpu/mcguard:$PYTHONPATH" MCGUARD_VERBOSE=1
  VLLM_FLASHINFER_ALLREDUCE_BACKEND=trtllm VLLM_ALLREDUCE_USE_FLASHINFER=0 VLLM_USE_NCCL_SYMM_MEM=0)
NO_FUSION='{"fuse_allreduce_rms": false, "fuse_gemm_comms": false, "enable_sp": false}'

if [[ ,$PHASES, == *,B,* ]] && [ "$(left)" -gt 200 ]; then
  echo "=== B after $(( $(date +%s) - t0 )) s, $(left) s left"
  setsid "${TP2_ENV[@]}" python3 $B/gpu_bench.py --out $R/b_70b_tp2 --root /tmp/gb --configs fp16-70b-tp2 \
    --pass-config "$NO_FUSION" --gpu-memory-utilization 0.6 -n 60 --rounds 2 --timeout-s $(( $(left) - 20 )) \
    > /tmp/lane_b.log 2>&1 &
  b=$!; wait $b; echo "B exited $? after $(( $(date +%s) - t0 )) s"; phase_end $b
  tail -n 30 /tmp/lane_b.log
  for log in /tmp/gpu_bench_*70b*.log /tmp/lane_b.log; do [ -f "$log" ] && mcguard_verdict "$log"; done
elif [[ ,$PHASES, == *,B,* ]]; then
  echo "B not run: $(left) s left"
fi

if [[ ,$PHASES, == *,C,* ]] && [ "$(left)" -gt 120 ]; then
  echo "=== C after $(( $(date +%s) - t0 )) s, $(left) s left"
  setsid "${TP2_ENV[@]}" python3 $B/gpu_bench.py --out $R/c_8b_tp2 --root /tmp/gb --configs fp16-tp2 \
    --pass-config "$NO_FUSION" -n 120 --rounds 3 --timeout-s $(( $(left) - 20 )) > /tmp/lane_c.log 2>&1 &
  c=$!; wait $c; echo "C exited $? after $(( $(date +%s) - t0 )) s"; phase_end $c
  tail -n 30 /tmp/lane_c.log
  for log in /tmp/gpu_bench_*tp2*.log /tmp/lane_c.log; do [ -f "$log" ] && mcguard_verdict "$log"; done
elif [[ ,$PHASES, == *,C,* ]]; then
  echo "C not run: $(left) s left"
fi
save
kill "$watchdog" 2>/dev/null
echo "run done after $(( $(date +%s) - t0 )) s"

#!/usr/bin/env bash
# Issue 16's second GPU session on a lent nvidia-h200-x2 (2 H200s, 32 cores): the FP16 70B-shaped
# model over both GPUs, the 8B shape at TP=1 and TP=2, stock `vllm serve` beside the 8B FP16 server
# and a py-spy profile of that server at concurrency 8, all in one call after the parts arrive.
#
# The vLLM 0.26.0 site travels as in issue16_host.sh (one zstd tar stream, 8 parts of <= 46 MiB,
# unpacked by boot/recv.py as they arrive); boot/ also holds py-spy's wheel (a static binary) and a
# copy of this script. The first call also starts make_bundle.py for both shapes (detached), so the
# models and bundles are ready when the last part comes:
#   call 0:    carry .gpu/t16/boot .gpu/t16/p00 .gpu/t16/main:  bash .gpu/t16/boot/issue16_s2_host.sh recv 00
#   calls 1-6: carry .gpu/t16/pNN:                              bash /tmp/t16boot/issue16_s2_host.sh part NN
#   call 7:    carry .gpu/t16/p07 .gpu/t16/main:                bash .gpu/t16/boot/issue16_s2_host.sh run 07
# (.gpu/t16/main: a copy of server/, clients/python/ and scripts/.)
# Call 7, one phase after another (each gpu_bench.py run in a process group of its own, waited
# for by pid and killed by group after, so no engine worker outlives its phase):
#   A, both GPUs apart (CUDA_VISIBLE_DEVICES, and cores 0-15 / 16-31):
#      GPU 0: fp16-base (8B, TP=1), then 1600 calls at c8 under py-spy, 800 more under py-spy --native;
#      GPU 1: vllm-serve-fp16-base (stock vllm serve, /pooling float and bytes, numpy heads);
#   B: fp16-70b-tp2 (70B FP16 over both GPUs, --gpu-memory-utilization 0.6);
#   C: fp16-tp2 (8B over both GPUs).
# No phase starts with less time left than it needs; a watchdog saves results and logs to $OUT
# before the call's 600 s run out. $OUT: s2.log, results.tgz (every gpu_bench.json/md, the py-spy
# files), logs.tgz (each configuration's full log). PHASES=B,C runs only those.
#
# As run on 2026-11-30 (device time 468 s: calls 0-6 77 s with the machine's start, call 7 376 s,
# then given back): A ran; B and C failed at vLLM's first profile run with "CUDA error: an illegal
# memory access" (surfacing as CUBLAS_STATUS_INTERNAL_ERROR in cublasCreate): vLLM 0.26 turns on
# its all-reduce + RMSNorm fusion for TP > 1 on Hopper and set it up on FlashInfer's "mnnvl"
# backend, which allocates NVLink multicast memory, which this host must not use (KINDS.md) and
# which does not work here. B and C now pass --pass-config '{"fuse_allreduce_rms": false}' and
# VLLM_FLASHINFER_ALLREDUCE_BACKEND=trtllm (no multicast, should anything still ask for it);
# not yet run so.
set -u
phase=${1:?recv|part|run}; part=${2:-}
P=/tmp/t16parts
t0=$(date +%s)
put_part() {  # atomically, so that recv.py never reads a half-copied part
  mkdir -p "$P" && cp ".gpu/t16/p$1/part.$1" "$P/.tmp" && mv "$P/.tmp" "$P/part.$1"
}
case $phase in
recv)
  put_part "$part"
  rm -rf /tmp/t16boot && cp -r .gpu/t16/boot /tmp/t16boot
  setsid nohup python3 /tmp/t16boot/recv.py /tmp/t16boot "$P" /tmp/site >/tmp/recv.log 2>&1 </dev/null &
  rm -rf /tmp/t16mb && cp -r .gpu/t16/main/scripts/bench/gpu /tmp/t16mb
  for shape in 8b 70b; do  # torch, safetensors and tokenizers are the image's
    setsid nohup python3 /tmp/t16mb/make_bundle.py /tmp/gb --shape $shape >/tmp/mb_$shape.log 2>&1 </dev/null &
  done
  nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader
  nproc; free -g | head -2; command -v taskset; sleep 2; cat /tmp/recv.log
  exit 0 ;;
part)
  put_part "$part"; sleep 1; cat /tmp/recv.log /tmp/mb_*.log; exit 0 ;;
run) ;;
*) echo "unknown phase $phase"; exit 2 ;;
esac

exec > >(tee "$OUT/s2.log") 2>&1
put_part "$part"
for _ in $(seq 180); do [ -f /tmp/site/.DONE ] && break; sleep 1; done
cat /tmp/recv.log
[ -f /tmp/site/.DONE ] || { echo "site not unpacked"; exit 3; }
rm -rf /tmp/code && cp -r .gpu/t16/main /tmp/code
for _ in $(seq 120); do [ -f /tmp/gb/bundle/bundle.json ] && [ -f /tmp/gb/bundle70b/bundle.json ] && break; sleep 1; done
cat /tmp/mb_*.log
cd /tmp/code || exit 3
export PYTHONPATH=/tmp/site:/tmp/code/server:/tmp/code/clients/python HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
  PYTHONUNBUFFERED=1
# No NVLink multicast on this host (KINDS.md); vLLM's symmetric-memory all-reduce (on by default in
# 0.26) would use torch's multimem operations, so TP=2 all-reduces go through custom IPC and NCCL.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0
# Nor FlashInfer's multicast ("mnnvl") all-reduce workspace, which vLLM 0.26 picks for its
# all-reduce + RMSNorm fusion at TP > 1 (it broke both TP=2 runs); the fusion is also turned off.
export VLLM_FLASHINFER_ALLREDUCE_BACKEND=trtllm
NO_AR_FUSION='{"fuse_allreduce_rms": false}'
PHASES=${PHASES:-A,B,C}
# The TP=2 phases crashed on the lent H200 pair: vLLM 0.26's fused all-reduce set up its FlashInfer
# workspace on PyTorch's symmetric memory, which, multicast being off there, had a null multicast
# pointer that the kernel stored through (BENCHMARKS.md "TP=2"). This script has no multicast guard:
# TP=2 runs go through s3_host.sh, which checks the guard (mcguard/) on the host first.
if [[ ,$PHASES, == *,B,* || ,$PHASES, == *,C,* ]] && [ "${TP2_MULTICAST_CHECKED:-}" != yes ]; then
  echo "refusing phases B/C (TP=2): set TP2_MULTICAST_CHECKED=yes only once no NVLink multicast path is left"
  PHASES=$(echo ",$PHASES," | sed 's/,B,/,/; s/,C,/,/; s/^,//; s/,$//')
fi
B=scripts/bench
R=/tmp/r16
mkdir -p $R /tmp/pyspy
python3 -m zipfile -e /tmp/t16boot/py_spy-*.whl /tmp/pyspy
PYSPY=$(ls /tmp/pyspy/py_spy-*.data/scripts/py-spy); chmod +x "$PYSPY"; "$PYSPY" --version
python3 -c 'import vllm, torch, grpc; print("vllm", vllm.__version__, "torch", torch.__version__, "grpc", grpc.__version__)'
echo "ready after $(( $(date +%s) - t0 )) s"
deadline=$(( t0 + ${DEADLINE_S:-545} ))
left() { echo $(( deadline - $(date +%s) )); }
save() {
  tar -czf "$OUT/results.tgz" -C /tmp r16 2>/dev/null
  tar -czf "$OUT/logs.tgz" /tmp/gpu_bench_*.log /tmp/lane_*.log 2>/dev/null
}
# Bring everything back if the call runs long (1 s sleeps: a killed watchdog leaves no long sleep behind).
( while [ "$(left)" -gt 0 ]; do sleep 1; done; save; echo "watchdog: results and logs saved" ) &
watchdog=$!
cores=$(nproc)
pin() {  # pin LANE to half of the cores when there are 32 or more
  if [ "$cores" -ge 32 ] && command -v taskset >/dev/null; then
    [ "$1" = 0 ] && echo "taskset -c 0-$(( cores / 2 - 1 ))" || echo "taskset -c $(( cores / 2 ))-$(( cores - 1 ))"
  fi
}
phase_end() {  # by group: engine workers (TP) and vllm serve's engine core go with their bench
  kill -- -"$1" 2>/dev/null; sleep 2; kill -9 -- -"$1" 2>/dev/null
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader
}

if [[ ,$PHASES, == *,A,* ]]; then
echo "=== A after $(( $(date +%s) - t0 )) s, $(left) s left"
CUDA_VISIBLE_DEVICES=0 setsid $(pin 0) python3 $B/gpu_bench.py --out $R/a0_fp16 --root /tmp/gb --configs fp16-base \
  -n 120 --rounds 3 --profile-n 1600 --profile-native --py-spy "$PYSPY" --timeout-s 300 > /tmp/lane_a0.log 2>&1 &
a0=$!
CUDA_VISIBLE_DEVICES=1 setsid $(pin 1) python3 $B/gpu_bench.py --out $R/a1_serve --root /tmp/gb \
  --configs vllm-serve-fp16-base -n 120 --rounds 3 --float-n 24 --serve-formats float,bytes --timeout-s 300 \
  > /tmp/lane_a1.log 2>&1 &
a1=$!
wait $a0; echo "A0 (fp16-base) exited $? after $(( $(date +%s) - t0 )) s"
wait $a1; echo "A1 (vllm-serve) exited $? after $(( $(date +%s) - t0 )) s"
phase_end $a0; phase_end $a1
tail -n 30 /tmp/lane_a0.log /tmp/lane_a1.log
fi

if [[ ,$PHASES, == *,B,* ]] && [ "$(left)" -gt 150 ]; then
  echo "=== B after $(( $(date +%s) - t0 )) s, $(left) s left"
  setsid python3 $B/gpu_bench.py --out $R/b_70b_tp2 --root /tmp/gb --configs fp16-70b-tp2 --pass-config "$NO_AR_FUSION" \
    --gpu-memory-utilization "${TP2_UTIL:-0.6}" -n 60 --rounds 2 --timeout-s $(( $(left) - 15 )) > /tmp/lane_b.log 2>&1 &
  b=$!; wait $b; echo "B exited $? after $(( $(date +%s) - t0 )) s"; phase_end $b
  tail -n 30 /tmp/lane_b.log
else
  echo "B not run: $(left) s left"
fi

if [[ ,$PHASES, == *,C,* ]] && [ "$(left)" -gt 100 ]; then
  echo "=== C after $(( $(date +%s) - t0 )) s, $(left) s left"
  setsid python3 $B/gpu_bench.py --out $R/c_8b_tp2 --root /tmp/gb --configs fp16-tp2 -n 120 --rounds 3 \
    --pass-config "$NO_AR_FUSION" \
    --timeout-s $(( $(left) - 15 )) > /tmp/lane_c.log 2>&1 &
  c=$!; wait $c; echo "C exited $? after $(( $(date +%s) - t0 )) s"; phase_end $c
  tail -n 30 /tmp/lane_c.log
else
  echo "C not run: $(left) s left"
fi
save
kill "$watchdog" 2>/dev/null
echo "run done after $(( $(date +%s) - t0 )) s"

#!/usr/bin/env bash
# Issue 16's runs on a lent nvidia-h200-x2 (2 H200s), as they were made. The vLLM 0.26.0 site (the
# trimmed wheel set of shared/gpu/README.md "Learned since", without FA2's 291 MB library, which an
# H200 never loads, plus the app's wheels) goes over as one zstd tar stream in 45 MiB parts; the
# first call starts boot/recv.py detached, which unpacks the parts into /tmp/site as they arrive:
# (boot/ holds recv.py, zstandard's wheel, SHA256SUMS of the parts and a copy of this script):
#   call 0:    carry .gpu/t16/boot .gpu/t16/p00:  bash .gpu/t16/boot/issue16_host.sh recv 00
#   calls 1-6: carry .gpu/t16/pNN:                bash /tmp/t16boot/issue16_host.sh part NN
#   call 7:    carry .gpu/t16/p07 .gpu/t16/main:  bash .gpu/t16/main/scripts/bench/gpu/issue16_host.sh m1 07
#   call 8:    (nothing carried)                  bash /tmp/t16boot/issue16_host.sh m2
# (.gpu/t16/main: a copy of server/, clients/python/ and scripts/.)
# m1: GPU 1 runs fullgraph_exp.py (FULL vs PIECEWISE vs eager, 8B shape, then with the rank-16
#     adapter) while GPU 0 runs gpu_bench.py awq-70b (the 70B AWQ twin on one GPU);
# m2: gpu_bench.py fp16-70b-tp2 (70B FP16 over both GPUs).
# What actually ran (device budget): calls 0-6 (~6 s each), m1 (lost to the `wait` bug fixed below),
# then by hand on the warm machine, from /tmp/code with the PYTHONPATH below:
#   CUDA_VISIBLE_DEVICES=1 python3 $B/gpu/fullgraph_exp.py --model /tmp/gb/llama8b --out $OUT --tag base \
#     --iters 30 --timeout-s 110 &   # beside:
#   CUDA_VISIBLE_DEVICES=0 python3 $B/gpu_bench.py --out $OUT/awq70 --root /tmp/gb --configs awq-70b \
#     --gpu-memory-utilization 0.5 -n 60 --rounds 2 --gap-ms 0
# and the LoRA variant with --timeout-s 66, too short for a cold LoRA compile (both modes timed out).
set -u
phase=${1:?recv|part|m1|m2}; part=${2:-}
here=$(pwd)
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
  nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader
  nproc; free -g | head -2; sleep 2; cat /tmp/recv.log
  exit 0 ;;
part)
  put_part "$part"; sleep 1; cat /tmp/recv.log; exit 0 ;;
esac

exec > >(tee "$OUT/$phase.log") 2>&1
if [ "$phase" = m1 ]; then
  put_part "$part"
  for _ in $(seq 180); do [ -f /tmp/site/.DONE ] && break; sleep 1; done
  cat /tmp/recv.log
  [ -f /tmp/site/.DONE ] || { echo "site not unpacked"; exit 3; }
  rm -rf /tmp/code && cp -r .gpu/t16/main /tmp/code  # later calls' trees do not touch the running code
fi
cd /tmp/code || exit 3
export PYTHONPATH=/tmp/site:/tmp/code/server:/tmp/code/clients/python HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
  PYTHONUNBUFFERED=1
B=scripts/bench
python3 -c 'import vllm, torch, grpc; print("vllm", vllm.__version__, "torch", torch.__version__, "grpc", grpc.__version__)'
echo "ready after $(( $(date +%s) - t0 )) s"
# Bring the logs back if the call runs long (1 s sleeps: a killed watchdog leaves no long sleep behind).
( for _ in $(seq "${WATCHDOG_S:-545}"); do sleep 1; done
  tar -czf "$OUT/logs_$phase.tgz" /tmp/fg_*.log /tmp/gpu_bench_*.log 2>/dev/null; echo "watchdog: logs saved" ) &
watchdog=$!
if [ "$phase" = m1 ]; then
  # Wait for these two by pid: a bare `wait` also waits for the watchdog, which cost the first m1
  # call its whole 590 s (bundles made at ~40 s, then nothing ran).
  python3 $B/gpu/make_bundle.py /tmp/gb & b1=$!
  python3 $B/gpu/make_bundle.py /tmp/gb --shape 70b & b2=$!
  wait $b1 $b2
  echo "bundles after $(( $(date +%s) - t0 )) s"
  ( export CUDA_VISIBLE_DEVICES=1
    python3 $B/gpu/fullgraph_exp.py --model /tmp/gb/llama8b --out "$OUT" --tag base
    echo "fullgraph base done after $(( $(date +%s) - t0 )) s"
    python3 $B/gpu/fullgraph_exp.py --model /tmp/gb/llama8b --out "$OUT" --tag lora \
      --lora /tmp/gb/bundle/lora_adapter --timeout-s 150
    echo "fullgraph lora done after $(( $(date +%s) - t0 )) s" ) > /tmp/fg_main.log 2>&1 &
  fg=$!
  CUDA_VISIBLE_DEVICES=0 python3 $B/gpu_bench.py --out "$OUT/awq70" --root /tmp/gb --configs awq-70b \
    --gpu-memory-utilization "${AWQ_UTIL:-0.5}" -n 120 --rounds 3 --budget-s 400
  echo "awq-70b done after $(( $(date +%s) - t0 )) s"
  wait $fg
  cat /tmp/fg_main.log
else
  python3 $B/gpu_bench.py --out "$OUT/tp2" --root /tmp/gb --configs fp16-70b-tp2 \
    --gpu-memory-utilization "${TP2_UTIL:-0.6}" -n 120 --rounds 3 --budget-s 400
  echo "fp16-70b-tp2 done after $(( $(date +%s) - t0 )) s"
fi
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader
tar -czf "$OUT/logs_$phase.tgz" /tmp/fg_*.log /tmp/gpu_bench_*.log 2>/dev/null
kill "$watchdog" 2>/dev/null
echo "$phase done after $(( $(date +%s) - t0 )) s"

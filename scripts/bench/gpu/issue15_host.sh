#!/usr/bin/env bash
# Issue 15's run on a lent nvidia-h200: what serving 1, 2 and 8 bundles on one 8B-shaped model
# costs (scripts/bench/bundles_bench.py), as it was made. The vLLM 0.26.0 site goes over as the
# zstd tar stream of issue16_host.sh (the same parts, .gpu/t16/pNN, and its boot/recv.py, which
# unpacks them into /tmp/site as they arrive), then this repository's code (.gpu/t15/main: a copy
# of server/, clients/python/ and scripts/):
#   call 0:    carry .gpu/t16/boot .gpu/t16/p00 .gpu/t15/main:  bash .gpu/t15/main/scripts/bench/gpu/issue15_host.sh recv 00
#   calls 1-6: carry .gpu/t16/pNN:                            bash /tmp/code/scripts/bench/gpu/issue15_host.sh part NN
#   call 7:    carry .gpu/t16/p07:                            bash /tmp/code/scripts/bench/gpu/issue15_host.sh bench 07
# (phase `lora` instead of `bench` runs scripts/bench/gpu/lora_mix.py: vLLM alone, one adapter
# against eight in a step, compiled and eager; that was a second run of the same calls.)
# Calls go back to back: the host and its /tmp go back 30 s after a call.
set -u
phase=${1:?recv|part|bench|lora}; part=${2:-}
P=/tmp/t16parts
t0=$(date +%s)
put_part() {  # atomically, so that recv.py never reads a half-copied part
  mkdir -p "$P" && cp ".gpu/t16/p$1/part.$1" "$P/.tmp" && mv "$P/.tmp" "$P/part.$1"
}
case $phase in
recv)
  put_part "$part"
  rm -rf /tmp/code /tmp/t16boot && cp -r .gpu/t15/main /tmp/code && cp -r .gpu/t16/boot /tmp/t16boot
  setsid nohup python3 /tmp/t16boot/recv.py /tmp/t16boot "$P" /tmp/site >/tmp/recv.log 2>&1 </dev/null &
  # The 8B-shaped bundles need only torch and tokenizers (in the image): made while the parts come.
  ( cd /tmp/code && setsid nohup sh -c 'python3 scripts/bench/gpu/make_bundle.py /tmp/gb --bundles 8 \
      > /tmp/make_bundle.log 2>&1 && touch /tmp/gb/.DONE' </dev/null >/dev/null 2>&1 & )
  nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader
  sleep 2; cat /tmp/recv.log
  exit 0 ;;
part)
  put_part "$part"; sleep 1; cat /tmp/recv.log; exit 0 ;;
esac

exec > >(tee "$OUT/$phase.log") 2>&1
put_part "$part"
for _ in $(seq 180); do [ -f /tmp/site/.DONE ] && break; sleep 1; done
cat /tmp/recv.log
[ -f /tmp/site/.DONE ] || { echo "site not unpacked"; exit 3; }
cd /tmp/code || exit 3
export PYTHONPATH=/tmp/site:/tmp/code/server:/tmp/code/clients/python HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
  PYTHONUNBUFFERED=1
python3 -c 'import vllm, torch, grpc; print("vllm", vllm.__version__, "torch", torch.__version__, "grpc", grpc.__version__)'
echo "ready after $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
# Everything goes under $OUT (the server logs too), which comes back even if the call runs out.
for _ in $(seq 120); do [ -f /tmp/gb/.DONE ] && break; sleep 1; done
cat /tmp/make_bundle.log
[ -f /tmp/gb/.DONE ] || { echo "bundles not made"; exit 3; }
echo "bundles after $(( $(date +%s) - t0 )) s"
if [ "$phase" = lora ]; then
  python3 scripts/bench/gpu/lora_mix.py --root /tmp/gb --out "$OUT/lm" --iters "${ITERS:-40}" --timeout-s 260
else
  python3 scripts/bench/bundles_bench.py --root /tmp/gb --out "$OUT/bb" --precision fp16 \
    -n "${N:-160}" --rounds "${ROUNDS:-2}" --gpu-memory-utilization 0.5 --startup-timeout-s 300
fi
echo "$phase run done after $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader
echo "$phase done after $(( $(date +%s) - t0 )) s"

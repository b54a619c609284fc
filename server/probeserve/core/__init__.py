"""The model-free core: what a probe request computes, without an engine or a transport.

Holds the bundle (loading, schemas), the prompt layout and its tokenization, the head math, span
decoding, the extraction pipeline (validate, prompt, engine, heads, spans) over an engine
*protocol*, the registry of loaded bundles (which one answers a request, and when a retired one
is idle), what a model directory says about itself (``checkpoint``), and the error types
every layer raises.

May import: the standard library, torch, safetensors and transformers (tokenizers). Never grpc,
never vLLM, and nothing else of ``probeserve`` (the rooms above it import the core, not the
reverse): checked by the import contracts in ``pyproject.toml``.
"""

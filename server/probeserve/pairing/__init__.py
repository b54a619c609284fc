"""Pairing: proving that a model is the one a bundle was trained for, before it serves.

``fingerprint`` and ``calibration`` hold the facts and the math, ``checks`` the structure,
provenance, function and sanity checks, ``pack`` writes a bundle's pairing files
(``probeserve bundle pack``), and ``reference`` is the independent transformers + peft
computation that both calibration and the parity tests trust.

May import: ``probeserve.core``, torch, transformers, peft, safetensors. Not the engines (the
function checks take any engine that satisfies the core's protocol), the transport, grpc or vLLM.
"""

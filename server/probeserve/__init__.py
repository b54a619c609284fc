"""probeserve: slot extraction by reading a language model's hidden states with probe heads.

Four rooms, each importing only the ones below it (``pyproject.toml``'s import contracts):
``transport`` (gRPC) over ``pairing`` and ``engines`` (vLLM), both over the model-free
``core``. ``cli``, ``logs`` and ``launcher`` sit at the top and may import any room.
"""

__version__ = "0.1.0"

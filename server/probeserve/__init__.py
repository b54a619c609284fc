"""probeserve: slot extraction by reading a language model's hidden states with probe heads."""

__version__ = "0.1.0"

"""parley: a self-hosted multi-LLM gateway and chat server that keeps every conversation."""

__version__ = "0.1.0"

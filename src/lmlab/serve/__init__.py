"""Serving a run over an OpenAI-compatible HTTP API with continuous batching (``lmlab serve``)."""

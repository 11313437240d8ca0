"""What one request may ask of the server; beyond it the client gets a 4xx (apart from the
rest of the server so that the CLI can read these defaults without importing the HTTP stack)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 1024
    """The largest ``max_tokens`` a request may ask for (and chat's default)."""
    max_prompt_tokens: int = 2048
    max_concurrent: int = 64
    """Requests in flight, running or queued; one more gets 429."""
    max_body_bytes: int = 1_000_000

"""sseproxy: a streaming relay for LLM chat, OpenAI-compatible upstream in, SSE out."""

__version__ = "0.1.0"

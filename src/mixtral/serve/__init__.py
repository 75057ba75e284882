"""The HTTP server: Mistral- and OpenAI-compatible API, tool calls, constrained decoding, metrics."""

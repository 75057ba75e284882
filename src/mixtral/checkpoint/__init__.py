"""Checkpoint formats (Hugging Face, Mistral consolidated) and the streaming loader."""

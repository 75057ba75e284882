"""Project-wide defaults that several commands share."""

from __future__ import annotations

# The model `mixtral generate`, `chat` and `serve` use when none is named: the bundled demo model
# (``mixtral/demo``), resolved by ``mixtral.checkpoint.loader.resolve``.
DEFAULT_MODEL = "demo"

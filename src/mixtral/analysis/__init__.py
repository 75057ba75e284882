"""Offline analyses of a model's behaviour (``mixtral routing``: which experts tokens are routed to)."""

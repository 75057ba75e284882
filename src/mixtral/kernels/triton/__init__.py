"""Triton GPU kernels, each tested against mixtral.kernels.reference."""

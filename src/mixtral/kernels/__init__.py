"""Compute kernels: a pure-PyTorch reference for every fused op, and Triton kernels held to it."""

"""Benchmarks run by `mixtral bench`: offline throughput, GPU decode/prefill against the roofline, HTTP load."""

"""Benchmarks of the fused kernels against the NumPy reference, naive and fused torch, and
torch.compile; run with `python -m bench` (see bench/__main__.py), results in bench/results/."""

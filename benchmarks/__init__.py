"""cellkern benchmarks: one script per op family over a shared harness.

Run a suite as a module, e.g. ``python -m benchmarks.propagate --help``;
results land in ``benchmarks/results/<suite>-<device-slug>-<date>.json``.
"""

"""SafeLlava speed and memory benchmarks against stock LLaVA (same weights, same inputs, one process).

Entry point: `python -m benchmarks.run --config cpu-small` (configs are data in `benchmarks/configs/*.json`);
results land in `benchmarks/results/` (`<config>.json`, `<config>.md`, `LATEST.md`). See `benchmarks/README.md`.
"""

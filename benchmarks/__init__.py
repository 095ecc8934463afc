"""Side-by-side benchmarks: ``python -m benchmarks [name ...]`` (or ``make bench``); see benchmarks/RESULTS.md."""

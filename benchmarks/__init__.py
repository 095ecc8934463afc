"""Side-by-side benchmarks: ``python -m benchmarks [NAME ...]`` or ``make bench``; results in RESULTS.md."""

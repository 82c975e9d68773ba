"""Benchmarks: `cfgen bench` (the guide stage's speed and profile, guide.py), `make bench-gpu` (gpu.py),
`make bench-threads` (threads.py), and random-weight models of real shapes to time them on (random_models.py)."""

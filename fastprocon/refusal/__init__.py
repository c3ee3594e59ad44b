"""Refusal: directions (difference in means at each layer input, directions.py), steering by them (steering.py),
refusal evaluation by generation (evaluate.py), and how far directions drift in training (drift.py)."""

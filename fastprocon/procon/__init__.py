"""ProCon on a model: its settings and normalisation (config.py), the alpha schedule (schedule.py), set-up of
directions and the initial model (setup.py), hooks at the decoder-layer inputs (hooks.py), and the reference
projections z0 (reference.py, reference_files.py)."""

"""Utilities at the bottom of the package: atomic file writes and JSON / safetensors I/O (io.py), memory-mapped
reads (mapped.py), content digests and manifests (checksums.py), plots (plots.py)."""

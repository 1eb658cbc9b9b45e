"""Conversion of official FS-DFM PyTorch checkpoints (needs the `convert` extra: torch)."""

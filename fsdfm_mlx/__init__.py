"""fsdfm-mlx: run FS-DFM few-step discrete flow-matching language models with MLX."""

__version__ = "0.1.0"

from .load import load  # noqa: E402

__all__ = ["load", "__version__"]

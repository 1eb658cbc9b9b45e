"""fsdfm-mlx: run FS-DFM few-step discrete flow-matching language models with MLX."""

__version__ = "0.1.0"

from ._cpu_blas import load_fast_blas  # noqa: E402  (must run before mlx.core is imported)

load_fast_blas()

from .load import default_model_path, load  # noqa: E402

__all__ = ["load", "default_model_path", "__version__"]

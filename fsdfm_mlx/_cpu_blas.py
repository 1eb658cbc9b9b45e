"""Give MLX's Linux CPU backend an optimized BLAS.

The ``mlx[cpu]`` wheels for Linux link the reference (netlib) BLAS, whose single-threaded ``sgemm`` runs
at a few GFLOP/s: on a 2-core x86 machine a [128, 256] x [256, 50257] float32 product takes ~1 s, 20x
slower than MKL. ``libmlx`` resolves ``cblas_sgemm`` at run time, so loading a BLAS that exports the
standard CBLAS symbols into the global namespace *before* ``mlx.core`` is first imported makes MLX use
it. We use Intel's MKL from the ``mkl`` wheel (pulled in by the ``cpu`` extra on x86-64 Linux).

Nothing happens on macOS (Metal / Accelerate), when ``mlx.core`` is already imported, when no MKL is
installed, or when ``FSDFM_MLX_BLAS=reference`` is set.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

STATE = {"blas": "default"}


def _candidates() -> list[str]:
    found = []
    for prefix in dict.fromkeys(
        (sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(sys.executable)))
    ):
        found += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")), reverse=True)
    return found


def load_fast_blas() -> str:
    """Load MKL globally for MLX's CPU backend if possible; returns what MLX's CPU matmuls will use."""
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return STATE["blas"]
    if os.environ.get("FSDFM_MLX_BLAS", "").lower() in ("reference", "off", "0", "none"):
        return STATE["blas"]
    libs = _candidates()
    if not libs:
        return STATE["blas"]
    layer = "SEQUENTIAL"
    for omp in ("libiomp5.so", "libgomp.so.1"):
        try:
            ctypes.CDLL(omp, mode=ctypes.RTLD_GLOBAL)
            layer = "INTEL" if omp == "libiomp5.so" else "GNU"
            break
        except OSError:
            continue
    os.environ.setdefault("MKL_THREADING_LAYER", layer)
    try:
        ctypes.CDLL(libs[0], mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return STATE["blas"]
    STATE["blas"] = (
        f"mkl ({os.path.basename(libs[0])}, {os.environ['MKL_THREADING_LAYER'].lower()} threading)"
    )
    return STATE["blas"]

"""wsiseg: whole-slide nuclei segmentation and tumour cellularity.

The public API (:mod:`wsiseg.api`): ``wsiseg.run(slide, out, ...)`` runs the engine and returns a
:class:`~wsiseg.api.Result`; ``wsiseg.open_result(out_dir)`` reads a finished run folder (maps as
dask arrays, tables as pandas DataFrames); ``wsiseg.load_model(name)`` loads a shipped model.
They are imported on first use, so ``import wsiseg`` stays light.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Result", "__version__", "load_model", "open_result", "run"]


def __getattr__(name: str):
    if name in ("Result", "load_model", "open_result", "run"):
        from wsiseg import api

        return getattr(api, name)
    raise AttributeError(f"module 'wsiseg' has no attribute {name!r}")

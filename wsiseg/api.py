"""The Python API: run the engine on a slide and read what it wrote, in a notebook or a script.

::

    import wsiseg

    res = wsiseg.run("slide.svs", "results/", instances=True)     # or wsiseg.open_result("results/slide")
    p = res.probability("nucleus")               # dask array (H, W) float32 in [0, 1], level 0
    res.cellularity.head()                       # pandas DataFrame, one row per scored window
    res.nuclei.groupby("type").area_um2.median() # one row per nucleus (with instances=True)

Coordinates: the maps are at the model's resolution (``res.mpp`` um/px at level 0); the tables
and the GeoJSON are in slide level-0 px (``res.scale_from_level0`` slide px per stored px).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from wsiseg.models.registry import LoadedModel
from wsiseg.models.registry import load_model as _load_model
from wsiseg.pipeline import RunConfig, run_slide
from wsiseg.predict import PredictorSpec
from wsiseg.slide import SlideError

__all__ = ["Result", "load_model", "open_result", "run"]

_STORE = "probabilities.zarr"


class ResultError(SlideError):
    """A folder that is not a wsiseg run folder (or not a finished one)."""


def load_model(name: str | Path | None = None) -> LoadedModel:
    """A shipped model by name (None: the default) or a ``NAME.safetensors`` path with its sidecar."""
    return _load_model(name)


@dataclasses.dataclass(frozen=True)
class Result:
    """A finished run folder ``OUT/<stem>/``, read lazily: nothing is loaded until asked for."""

    out_dir: Path

    @property
    def summary(self) -> dict:
        """``summary.json`` (exists only once the run finished)."""
        return json.loads((self.out_dir / "summary.json").read_text())

    @property
    def attrs(self) -> dict:
        """The Zarr group's ``wsiseg`` attributes (mpp, model, channels, scale_from_level0, ...)."""
        import zarr

        return dict(zarr.open_group(str(self.out_dir / _STORE), mode="r").attrs["wsiseg"])

    @property
    def channels(self) -> list[str]:
        return list(self.attrs["classes"])

    @property
    def mpp(self) -> float:
        """um/px of level 0 of the maps (the model's resolution)."""
        return float(self.attrs["mpp"])

    @property
    def scale_from_level0(self) -> float:
        """Slide level-0 px per stored px."""
        return float(self.attrs.get("scale_from_level0", 1.0))

    @property
    def levels(self) -> int:
        """How many pyramid levels the maps have (level ``i`` is downsampled by ``2**i``)."""
        import zarr

        return len(zarr.open_group(str(self.out_dir / _STORE), mode="r").attrs["multiscales"][0]["datasets"])

    def probabilities(self, level: int = 0):
        """Dask array (C, H, W) uint8 = round(p x 255) of pyramid ``level`` (read chunk by chunk)."""
        import dask.array as da

        return da.from_zarr(str(self.out_dir / _STORE), component=str(level))

    def probability(self, channel: str = "nucleus", level: int = 0):
        """Dask array (H, W) float32 in [0, 1] of one channel at pyramid ``level``."""
        chans = self.channels
        if channel not in chans:
            raise KeyError(f"{self.out_dir}: no channel {channel!r} (channels: {', '.join(chans)})")
        return self.probabilities(level)[chans.index(channel)].astype("float32") / 255

    def labels(self, level: int = 0):
        """Dask array (H, W) uint32 nucleus ids (0 = background), or None without instances."""
        import dask.array as da

        path = self.out_dir / _STORE / "labels" / "nuclei"
        if not path.is_dir():
            return None
        return da.from_zarr(str(path), component=str(level))[0]

    def _table(self, name: str):
        import pandas as pd

        path = self.out_dir / name
        return pd.read_csv(path) if path.is_file() else None

    @property
    def cellularity(self):
        """pandas DataFrame of ``cellularity.csv`` (x, y, width, height in slide level-0 px,
        tissue_fraction, one column per regressor), or None when the stage did not run."""
        return self._table("cellularity.csv")

    @property
    def nuclei(self):
        """pandas DataFrame of ``nuclei.csv`` (id, centroid in slide level-0 px, area_um2, type,
        class probabilities), or None without instances."""
        return self._table("nuclei.csv")

    @property
    def geojson(self) -> Path | None:
        """Path of ``nuclei.geojson`` (QuPath detections), or None without instances."""
        p = self.out_dir / "nuclei.geojson"
        return p if p.is_file() else None


def open_result(out_dir: str | Path) -> Result:
    """The run folder ``out_dir`` (``OUT/<stem>/``) of a finished ``wsiseg run``."""
    out_dir = Path(out_dir)
    if not (out_dir / "summary.json").is_file() or not (out_dir / _STORE).is_dir():
        raise ResultError(f"{out_dir}: not a finished wsiseg run folder (no summary.json and {_STORE}; "
                          "run `wsiseg run` or wsiseg.run() first)")
    return Result(out_dir)


def run(slide: str | Path, out: str | Path = "wsiseg-out", model: str | Path | LoadedModel | None = None,
        device: str = "auto", backend: str = "auto", tta: str = "none", threads: int | None = None,
        **options: Any) -> Result:
    """Run the engine on one slide or image, as ``wsiseg run`` does, into ``out/<stem>/``.

    ``options`` are :class:`wsiseg.config.RunConfig` options by flat name (``mpp``, ``instances``,
    ``cellularity``, ``tile``, ``overlap``, ``batch_size``, ``overwrite``, ...). A finished output
    is returned as it is; an interrupted one is resumed. Raises :class:`SlideError` for bad input."""
    from wsiseg.inputs import out_names

    cfg = RunConfig.of(**options)  # an unknown option: TypeError, before the model is loaded
    loaded = model if isinstance(model, LoadedModel) else _load_model(model)
    predictor = PredictorSpec(None, device, threads, tta, backend).build(loaded)
    slide = Path(slide)
    res = run_slide(slide, Path(out) / out_names([slide])[0], predictor, cfg)
    return Result(res.out_dir)

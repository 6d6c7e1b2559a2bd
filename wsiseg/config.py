"""What a run is asked to do: :class:`RunConfig`, by concern, and its command-line flags.

One table: each field of :class:`RunConfig` carries its concern and, where it has one, its flag
(help, type, choices, and how the parsed value becomes the field's). ``wsiseg run``'s flags are
built from it (:func:`add_arguments`) and read back into a config (:meth:`RunConfig.from_args`);
the concerns are:

- ``tiling``: what decides the map's bytes (compared whole when a run resumes: :data:`MAP_FIELDS`);
- ``limits``: inputs refused before any work;
- ``engine``: how fast, not what (batch size, reader threads, blending threads and device);
- ``stain``: stain normalisation fitted once per slide (:mod:`wsiseg.stain`);
- ``cellularity``, ``instances``: the stages on the finished map;
- ``output``: what happens to an existing run folder.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

from wsiseg.slide import MAX_IMAGE_PIXELS, MAX_RESCALE

CONCERNS = ("tiling", "limits", "engine", "stain", "cellularity", "instances", "output")
STAIN_METHODS = ("none", "reinhard", "macenko", "vahadane")
BLEND_THREAD = {"auto": None, "on": True, "off": False}  # --blend-thread -> RunConfig.blend_thread


def _none_word(v: str | None) -> str | None:
    return None if v == "none" else v


def _opt(default: Any, concern: str, flag: str | None = None, *, arg_default: Any = ...,
         to_config: Callable[[Any], Any] | None = None, **argparse_kw: Any):
    """A RunConfig field: its default, its concern and (optionally) its flag. ``argparse_kw`` go to
    ``add_argument``; ``arg_default`` is the flag's default where it is spelled otherwise than the
    field's (e.g. ``--blend-thread auto`` for None); ``to_config`` maps the parsed value back."""
    assert concern in CONCERNS, concern
    meta = {"concern": concern, "flag": flag, "argparse": argparse_kw, "to_config": to_config,
            "arg_default": default if arg_default is ... else arg_default}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    # ---- tiling: decides the map's bytes
    tile: int = _opt(256, "tiling", "--tile", type=int, help="tile size, model px (default 256)")
    overlap: float = _opt(0.5, "tiling", "--overlap", type=float, help="tile overlap share (default 0.5)")
    window: str = _opt("hann", "tiling", "--window", choices=["hann", "gaussian", "flat"], help="blending window")
    chunk: int = _opt(512, "tiling")  # the Zarr chunk, model px
    mpp: float | None = _opt(None, "tiling", "--mpp", type=float,
                             help="um/px of inputs that do not say it (plain images); a file's own resolution is kept")
    mpp_override: float | None = _opt(None, "tiling", "--mpp-override", type=float, metavar="MPP",
                                      help="um/px of every input, replacing what the files say (recorded in summary.json)")
    thumbnail_size: int = _opt(2048, "tiling")  # the tissue mask is found on a thumbnail this size
    tissue: bool = _opt(True, "tiling", "--no-tissue-mask", action="store_true", arg_default=False,
                        to_config=lambda v: not v, help="infer every tile, background too")
    # ---- limits: inputs refused before any work
    max_rescale: float = _opt(MAX_RESCALE, "limits", "--max-rescale", type=float, metavar="F",
                              help=f"refuse inputs that would be resampled more than F times either way to the "
                                   f"model's resolution (default {MAX_RESCALE:g}: 1/{MAX_RESCALE:g} to {MAX_RESCALE:g})")
    max_image_pixels: int = _opt(MAX_IMAGE_PIXELS, "limits", "--max-image-pixels", type=int, metavar="N",
                                 help=f"refuse plain images (PNG, JPEG, BMP, a TIFF not read piece by piece) over N "
                                      f"pixels, which are decoded whole (default {MAX_IMAGE_PIXELS:,})")
    # ---- engine: how fast, not what
    batch_size: int = _opt(8, "engine", "--batch-size", type=int, help="tiles per forward pass (default 8)")
    workers: int = _opt(2, "engine", "--workers", type=int, help="reader threads (default 2)")
    block_tiles: int = _opt(8, "engine")
    # blend and release blocks in a thread while the next batch is inferred: True, False, or None
    # (auto: on with a GPU, off on a CPU, where the network already uses every core)
    blend_thread: bool | None = _opt(None, "engine", "--blend-thread", arg_default="auto", to_config=BLEND_THREAD.get,
                                     choices=list(BLEND_THREAD),
                                     help="blend each batch in a thread while the next is inferred "
                                          "(auto: on with CUDA, off on CPU)")
    # blend on the predictor's device (a GPU): accumulators there, only uint8 blocks come back
    blend_on_device: bool = _opt(False, "engine", "--blend-on-device", action="store_true",
                                 help="blend on the GPU: accumulate and quantise there, copy back uint8 blocks only")
    # ---- stain: fitted once per slide (wsiseg.stain); None: as the model's sidecar says it was trained
    stain: str | None = _opt(None, "stain", "--stain", choices=list(STAIN_METHODS),
                             help="stain normalisation, fitted once per slide (default: as the model was trained, "
                                  "else none)")
    stain_target: str | None = _opt(None, "stain", "--stain-target", metavar="IMAGE",
                                    help="normalise to this image's stains (default: the model's training reference)")
    clahe: bool | None = _opt(None, "stain", "--clahe", action=argparse.BooleanOptionalAction,
                              help="contrast-limited histogram equalisation of L, one table per slide "
                                   "(default: as the model was trained)")
    # ---- cellularity (seed 003), on the finished map; see wsiseg.scoring
    cellularity: bool = _opt(True, "cellularity", "--no-cellularity", action="store_true", arg_default=False,
                             to_config=lambda v: not v, help="skip the cellularity stage")
    cell_window: int = _opt(512, "cellularity", "--cell-window", type=int, help="cellularity window, model px (default 512)")
    cell_stride: int | None = _opt(None, "cellularity", "--cell-stride", type=int,
                                   help="cellularity window stride (default: the window)")
    cell_min_tissue: float = _opt(0.05, "cellularity", "--cell-min-tissue", type=float,
                                  help="score windows with at least this tissue share")
    lgbm: str | None = _opt("cellularity-lgbm-proxy", "cellularity", "--lgbm", to_config=_none_word,
                            help="LightGBM regressor name/path, or none")
    cnn: str | None = _opt("cellularity-cnn-proxy", "cellularity", "--cnn", to_config=_none_word,
                           help="CNN regressor name/path, or none")
    # ---- instances (label image + GeoJSON) from the finished map; see wsiseg.instances
    instances: bool = _opt(False, "instances", "--instances", action="store_true",
                           help="also write nucleus instances: probabilities.zarr/labels/nuclei and nuclei.geojson (QuPath)")
    # ---- output
    overwrite: bool = _opt(False, "output", "--overwrite", action="store_true",
                           help="remove wsiseg's own files in OUT/<stem>/ and start again (a folder with other files is refused)")

    def part(self, concern: str) -> dict[str, Any]:
        """This config's fields of one concern, in table order: ``cfg.part("tiling")``."""
        if concern not in CONCERNS:
            raise ValueError(f"unknown concern {concern!r}; one of {', '.join(CONCERNS)}")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["concern"] == concern}

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> "RunConfig":
        """The config that :func:`add_arguments`' flags parsed into ``args`` say; flags a parser
        did not define keep the field's default."""
        values = {}
        for f in fields(cls):
            flag = f.metadata["flag"]
            dest = _dest(flag) if flag else None
            if dest is None or not hasattr(args, dest):
                continue
            v = getattr(args, dest)
            conv = f.metadata["to_config"]
            values[f.name] = conv(v) if conv else v
        return replace(cls(**values), **overrides)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_arguments(parser: argparse.ArgumentParser, *concerns: str) -> argparse.ArgumentParser:
    """The flags of RunConfig's fields of these concerns (all, when none is named), in table order."""
    unknown = set(concerns) - set(CONCERNS)
    if unknown:
        raise ValueError(f"unknown concern(s) {', '.join(sorted(unknown))}; one of {', '.join(CONCERNS)}")
    for f in fields(RunConfig):
        m = f.metadata
        if m["flag"] and (not concerns or m["concern"] in concerns):
            parser.add_argument(m["flag"], default=m["arg_default"], **m["argparse"])
    return parser


# The RunConfig fields that decide the map's bytes: a resumed run must have the same values (the
# others, e.g. batch size, reader threads or blending threads, change how fast, not what).
MAP_FIELDS = tuple(RunConfig().part("tiling"))

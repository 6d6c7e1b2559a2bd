"""What a run is asked to do: :class:`RunConfig`, one frozen part per concern, and its flags.

One table: each field of each part carries its flag where it has one (help, type, choices, and
how the parsed value becomes the field's) and its *option* name, the flat name that
:meth:`RunConfig.of`, :func:`wsiseg.run`'s keywords and ``summary.json``'s ``config`` use.
``wsiseg run``'s flags are built from it (:func:`add_arguments`) and read back into a config
(:meth:`RunConfig.from_args`). The parts are:

- ``tiling`` (:class:`Tiling`): what decides the map's bytes (compared whole when a run resumes:
  :data:`MAP_FIELDS`);
- ``limits`` (:class:`Limits`): inputs refused before any work;
- ``engine`` (:class:`Engine`): how fast, not what (batch size, reader threads, blending threads
  and device);
- ``stain`` (:class:`StainOptions`): stain normalisation fitted once per slide (:mod:`wsiseg.stain`);
- ``cellularity``, ``instances`` (:class:`CellularityOptions`, :class:`InstancesOptions`): the
  stages on the finished map;
- ``output`` (:class:`Output`): what happens to an existing run folder.

``RunConfig.of(mpp=0.5, tissue=False)`` builds one from option names;
``cfg.tiling.tile``, ``cfg.cellularity.enabled`` read it.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

from wsiseg.slide import MAX_IMAGE_PIXELS, MAX_RESCALE

STAIN_METHODS = ("none", "reinhard", "macenko", "vahadane")
BLEND_THREAD = {"auto": None, "on": True, "off": False}  # --blend-thread -> Engine.blend_thread


def _none_word(v: str | None) -> str | None:
    return None if v == "none" else v


def _opt(default: Any, flag: str | None = None, *, option: str | None = None, arg_default: Any = ...,
         to_config: Callable[[Any], Any] | None = None, **argparse_kw: Any):
    """A field of one of RunConfig's parts: its default and (optionally) its flag and its option
    name (the field's own name unless given). ``argparse_kw`` go to ``add_argument``;
    ``arg_default`` is the flag's default where it is spelled otherwise than the field's (e.g.
    ``--blend-thread auto`` for None); ``to_config`` maps the parsed value back."""
    meta = {"flag": flag, "option": option, "argparse": argparse_kw, "to_config": to_config,
            "arg_default": default if arg_default is ... else arg_default}
    return field(default=default, metadata=meta)


def _option(f) -> str:
    return f.metadata["option"] or f.name


class _Part:
    """A part of RunConfig. ``if cfg.cellularity:`` would always be true, so a part has no truth
    value: ``cfg.cellularity.enabled`` says whether the stage runs."""

    def __bool__(self):
        raise TypeError(f"{type(self).__name__} has no truth value (a stage's part says .enabled)")


@dataclass(frozen=True)
class Tiling(_Part):
    """What decides the map's bytes."""
    tile: int = _opt(256, "--tile", type=int, help="tile size, model px (default 256)")
    overlap: float = _opt(0.5, "--overlap", type=float, help="tile overlap share (default 0.5)")
    window: str = _opt("hann", "--window", choices=["hann", "gaussian", "flat"], help="blending window")
    chunk: int = _opt(512)  # the Zarr chunk, model px
    mpp: float | None = _opt(None, "--mpp", type=float,
                             help="um/px of inputs that do not say it (plain images); a file's own resolution is kept")
    mpp_override: float | None = _opt(None, "--mpp-override", type=float, metavar="MPP",
                                      help="um/px of every input, replacing what the files say (recorded in summary.json)")
    thumbnail_size: int = _opt(2048)  # the tissue mask is found on a thumbnail this size
    tissue: bool = _opt(True, "--no-tissue-mask", action="store_true", arg_default=False,
                        to_config=lambda v: not v, help="infer every tile, background too")


@dataclass(frozen=True)
class Limits(_Part):
    """Inputs refused before any work."""
    max_rescale: float = _opt(MAX_RESCALE, "--max-rescale", type=float, metavar="F",
                              help=f"refuse inputs that would be resampled more than F times either way to the "
                                   f"model's resolution (default {MAX_RESCALE:g}: 1/{MAX_RESCALE:g} to {MAX_RESCALE:g})")
    max_image_pixels: int = _opt(MAX_IMAGE_PIXELS, "--max-image-pixels", type=int, metavar="N",
                                 help=f"refuse plain images (PNG, JPEG, BMP, a TIFF not read piece by piece) over N "
                                      f"pixels, which are decoded whole (default {MAX_IMAGE_PIXELS:,})")


@dataclass(frozen=True)
class Engine(_Part):
    """How fast, not what."""
    batch_size: int = _opt(8, "--batch-size", type=int, help="tiles per forward pass (default 8)")
    workers: int = _opt(2, "--workers", type=int, help="reader threads (default 2)")
    block_tiles: int = _opt(8)
    # blend and release blocks in a thread while the next batch is inferred: True, False, or None
    # (auto: on with a GPU, off on a CPU, where the network already uses every core)
    blend_thread: bool | None = _opt(None, "--blend-thread", arg_default="auto", to_config=BLEND_THREAD.get,
                                     choices=list(BLEND_THREAD),
                                     help="blend each batch in a thread while the next is inferred "
                                          "(auto: on with CUDA, off on CPU)")
    # blend on the predictor's device (a GPU): accumulators there, only uint8 blocks come back
    blend_on_device: bool = _opt(False, "--blend-on-device", action="store_true",
                                 help="blend on the GPU: accumulate and quantise there, copy back uint8 blocks only")


@dataclass(frozen=True)
class StainOptions(_Part):
    """Stain normalisation, fitted once per slide (:mod:`wsiseg.stain`); ``method`` None: as the
    model's sidecar says it was trained."""
    method: str | None = _opt(None, "--stain", option="stain", choices=list(STAIN_METHODS),
                              help="stain normalisation, fitted once per slide (default: as the model was trained, "
                                   "else none)")
    target: str | None = _opt(None, "--stain-target", option="stain_target", metavar="IMAGE",
                              help="normalise to this image's stains (default: the model's training reference)")
    clahe: bool | None = _opt(None, "--clahe", action=argparse.BooleanOptionalAction,
                              help="contrast-limited histogram equalisation of L, one table per slide "
                                   "(default: as the model was trained)")


@dataclass(frozen=True)
class CellularityOptions(_Part):
    """Cellularity (seed 003) on the finished map; see :mod:`wsiseg.scoring`."""
    enabled: bool = _opt(True, "--no-cellularity", option="cellularity", action="store_true", arg_default=False,
                         to_config=lambda v: not v, help="skip the cellularity stage")
    window: int = _opt(512, "--cell-window", option="cell_window", type=int,
                       help="cellularity window, model px (default 512)")
    stride: int | None = _opt(None, "--cell-stride", option="cell_stride", type=int,
                              help="cellularity window stride (default: the window)")
    min_tissue: float = _opt(0.05, "--cell-min-tissue", option="cell_min_tissue", type=float,
                             help="score windows with at least this tissue share")
    lgbm: str | None = _opt("cellularity-lgbm-proxy", "--lgbm", to_config=_none_word,
                            help="LightGBM regressor name/path, or none")
    cnn: str | None = _opt("cellularity-cnn-proxy", "--cnn", to_config=_none_word,
                           help="CNN regressor name/path, or none")

    def regressors(self) -> dict[str, str]:
        """The regressors to score with (``{"lgbm": name, "cnn": name}``), none when disabled."""
        return {k: v for k, v in (("lgbm", self.lgbm), ("cnn", self.cnn)) if v} if self.enabled else {}


@dataclass(frozen=True)
class InstancesOptions(_Part):
    """Nucleus instances (label image + GeoJSON) from the finished map; see :mod:`wsiseg.instances`."""
    enabled: bool = _opt(False, "--instances", option="instances", action="store_true",
                         help="also write nucleus instances: probabilities.zarr/labels/nuclei and nuclei.geojson (QuPath)")


@dataclass(frozen=True)
class Output(_Part):
    """What happens to an existing run folder."""
    overwrite: bool = _opt(False, "--overwrite", action="store_true",
                           help="remove wsiseg's own files in OUT/<stem>/ and start again (a folder with other files is refused)")


PARTS = {"tiling": Tiling, "limits": Limits, "engine": Engine, "stain": StainOptions,
         "cellularity": CellularityOptions, "instances": InstancesOptions, "output": Output}
CONCERNS = tuple(PARTS)
# option name -> (part, field name), in table order
_OPTIONS = {_option(f): (part, f.name) for part, cls in PARTS.items() for f in fields(cls)}


@dataclass(frozen=True)
class RunConfig:
    tiling: Tiling = field(default_factory=Tiling)
    limits: Limits = field(default_factory=Limits)
    engine: Engine = field(default_factory=Engine)
    stain: StainOptions = field(default_factory=StainOptions)
    cellularity: CellularityOptions = field(default_factory=CellularityOptions)
    instances: InstancesOptions = field(default_factory=InstancesOptions)
    output: Output = field(default_factory=Output)

    @staticmethod
    def options() -> tuple[str, ...]:
        """Every option name, in table order."""
        return tuple(_OPTIONS)

    @classmethod
    def of(cls, **options: Any) -> "RunConfig":
        """The defaults, with these options (flat names: ``RunConfig.of(mpp=0.5, tissue=False)``)."""
        return cls().replace(**options)

    def replace(self, **options: Any) -> "RunConfig":
        """This config with these options (flat names) changed."""
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; known run options: {', '.join(_OPTIONS)}")
        by_part: dict[str, dict[str, Any]] = {}
        for name, v in options.items():
            part, fname = _OPTIONS[name]
            by_part.setdefault(part, {})[fname] = v
        return replace(self, **{part: replace(getattr(self, part), **kw) for part, kw in by_part.items()})

    def flat(self) -> dict[str, Any]:
        """Every option's value by its flat name, in table order (``summary.json``'s ``config``)."""
        return {name: getattr(getattr(self, part), fname) for name, (part, fname) in _OPTIONS.items()}

    def part(self, concern: str) -> dict[str, Any]:
        """One part's options by flat name, in table order: ``cfg.part("tiling")``."""
        if concern not in PARTS:
            raise ValueError(f"unknown concern {concern!r}; one of {', '.join(CONCERNS)}")
        return {_option(f): getattr(getattr(self, concern), f.name) for f in fields(PARTS[concern])}

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> "RunConfig":
        """The config that :func:`add_arguments`' flags parsed into ``args`` say; flags a parser
        did not define keep the field's default. ``overrides`` are options by flat name."""
        values = {}
        for cls_ in PARTS.values():
            for f in fields(cls_):
                flag = f.metadata["flag"]
                dest = _dest(flag) if flag else None
                if dest is None or not hasattr(args, dest):
                    continue
                v = getattr(args, dest)
                conv = f.metadata["to_config"]
                values[_option(f)] = conv(v) if conv else v
        return cls.of(**values, **overrides)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_arguments(parser: argparse.ArgumentParser, *concerns: str) -> argparse.ArgumentParser:
    """The flags of RunConfig's parts of these concerns (all, when none is named), in table order."""
    unknown = set(concerns) - set(CONCERNS)
    if unknown:
        raise ValueError(f"unknown concern(s) {', '.join(sorted(unknown))}; one of {', '.join(CONCERNS)}")
    for concern, cls_ in PARTS.items():
        if concerns and concern not in concerns:
            continue
        for f in fields(cls_):
            m = f.metadata
            if m["flag"]:
                parser.add_argument(m["flag"], default=m["arg_default"], **m["argparse"])
    return parser


# The RunConfig fields that decide the map's bytes: a resumed run must have the same values (the
# others, e.g. batch size, reader threads or blending threads, change how fast, not what).
MAP_FIELDS = tuple(RunConfig().part("tiling"))

"""Predictor: batches of RGB tiles -> per-class probabilities, on CUDA (AMP) or all CPU cores."""
from __future__ import annotations

import copy
import functools
import io
import logging
import os
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from wsiseg.models.registry import LoadedModel

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def fold_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """Fold every BatchNorm2d that directly follows a Conv2d in an ``nn.Sequential`` into the
    convolution (eval-mode statistics; ``torch.nn.utils.fusion.fuse_conv_bn_eval``). Returns a
    new module; the input is left untouched. Same outputs up to float rounding, one op fewer."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(net).eval()
    for mod in net.modules():
        if not isinstance(mod, torch.nn.Sequential):
            continue
        names = list(mod._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = mod._modules[a], mod._modules[b]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d) and bn.track_running_stats:
                mod._modules[a] = fuse_conv_bn_eval(conv, bn)
                mod._modules[b] = torch.nn.Identity()
    return net


@contextmanager
def _one_thread(numel: int):
    """Run the block with one torch CPU thread (then restore the count), for the activation of
    ``numel`` elements after the network: on a CPU shared with reader threads (and other jobs),
    OpenMP's parallel loops over a few MB cost more in synchronisation than they gain. Only where
    the values cannot change: an elementwise kernel runs its vectorised loop over each thread's
    share and a scalar loop over what is left of it (the scalar exp may round differently), so
    when ``numel`` is a multiple of 32 per thread (2 AVX-512 vectors; tiles of a multiple of 16
    px, as every shipped model needs) no element is left to the scalar loop either way."""
    n = torch.get_num_threads()
    if n == 1 or numel % (32 * n):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


BACKENDS = ("auto", "torch", "openvino", "openvino-int8")


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported (a dependency of the default install)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


@functools.lru_cache(maxsize=None)
def openvino_core():
    """The process's one ``openvino.Core``, made on first use and kept until exit.

    OpenVINO's CPU plugin, when a Core first compiles on it, gives the calling thread a signal
    stack of its own (``sigaltstack``, for AMX tile state) and, when that Core is released, puts
    back the stack it found, but only if its own is still the current one; it unmaps its own
    either way. Two Cores released in the order they were made therefore leave the thread's
    signal stack pointing at unmapped memory, and the next signal that Python handles there
    (Ctrl-C, SIGTERM, the SIGCHLD of a data loader's child) kills the process with SIGSEGV and
    no traceback. One Core for every compiled network keeps that stack valid."""
    import openvino as ov

    return ov.Core()


def pad_to_multiple(image: np.ndarray, multiple: int, square: bool = False) -> np.ndarray:
    """An (H, W, ...) image padded at the bottom and right to a multiple of ``multiple`` px (to a
    square of that multiple with ``square``), by reflection (by the edge for an image 1 px wide):
    the one whole-image input of every "pad, forward, crop" prediction."""
    h, w = image.shape[:2]
    ph, pw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    if square:
        ph = pw = max(ph, pw)
    pad = ((0, ph - h), (0, pw - w)) + ((0, 0),) * (image.ndim - 2)
    return np.pad(image, pad, mode="reflect" if min(h, w) > 1 else "edge")


def calibration_tiles(mpp: float, n: int = 64, tile: int = 256, min_tissue: float = 0.5) -> np.ndarray:
    """(n, tile, tile, 3) uint8 tissue tiles of the bundled sample slide (CMU-1-Small-Region, H&E
    breast, CC0) read at ``mpp`` um/px, for calibrating INT8 quantisation: the tiles of a
    half-overlapping grid whose tissue fraction (:func:`wsiseg.tissue.tissue_mask`) is at least
    ``min_tissue``, ``n`` of them evenly spaced over the grid (fewer if the slide has fewer; at
    0.5 um/px the grid at half-tile stride holds 147 such tiles).
    Deterministic: the same model always gets the same calibration set."""
    from wsiseg.slide import SAMPLE, ScaledView, open_slide
    from wsiseg.tissue import tissue_mask

    reader = open_slide(SAMPLE)
    try:
        view = ScaledView.create(reader, mpp)
        h, w = view.shape
        img = view.read(0, 0, max(h, tile), max(w, tile))
    finally:
        reader.close()
    mask = tissue_mask(img)
    step = tile // 2
    grid = [(y, x) for y in range(0, img.shape[0] - tile + 1, step) for x in range(0, img.shape[1] - tile + 1, step)
            if mask[y:y + tile, x:x + tile].mean() >= min_tissue]
    if not grid:
        raise ValueError(f"no tissue tiles for INT8 calibration in {SAMPLE}")
    pick = np.unique(np.linspace(0, len(grid) - 1, min(n, len(grid))).round().astype(int))
    return np.stack([img[y:y + tile, x:x + tile] for y, x in (grid[i] for i in pick)])


class OpenVINONet(torch.nn.Module):
    """A network compiled by OpenVINO for the CPU, called like the torch module it came from.

    The module (BatchNorm folded) is converted in memory by ``openvino.convert_model`` (traced,
    nothing written, no file loaded), with dynamic batch and tile size, the input declared NHWC
    (the normalised tiles' own layout: OpenVINO transposes inside the graph) and float32
    inference forced (``INFERENCE_PRECISION_HINT``: on CPUs with bfloat16 units OpenVINO would
    otherwise lower the precision). ``forward`` takes an NCHW tensor of any memory layout (a
    channels_last view is passed without a copy) and returns the float32 logits as an NCHW
    tensor. Needs the ``openvino`` package (``pip install 'wsiseg[openvino]'``).

    ``calibration``: (N, H, W, C) float32 normalised tiles (NHWC, as ``forward`` receives them):
    the converted model is then quantised to INT8 by NNCF's post-training quantisation
    (``nncf.quantize``: activation ranges from these tiles, weights per channel, fast bias
    correction) before compiling; the convolutions then run in 8-bit integers, which changes
    the probabilities slightly (``wsiseg run --backend openvino-int8``; measure the change on
    your data with ``wsiseg eval``). Needs ``nncf`` too."""

    def __init__(self, net: torch.nn.Module, threads: int, in_channels: int = 3,
                 calibration: np.ndarray | None = None):
        super().__init__()
        try:
            import openvino as ov
        except ImportError as e:
            raise ValueError("--backend openvino needs the openvino package: pip install 'wsiseg[openvino]'") from e
        model = _convert_openvino(ov, net, in_channels)
        if len(model.inputs) != 1:  # seen once, in a Dask worker; a second conversion is cheap (< 1 s)
            log.warning("OpenVINO converted %s to %d inputs (%s); converting again", type(net).__name__,
                        len(model.inputs), _input_names(model))
            model = _convert_openvino(ov, net, in_channels)
        if len(model.inputs) != 1:
            raise ValueError(f"OpenVINO converted {type(net).__name__} to a model with {len(model.inputs)} inputs "
                             f"({_input_names(model)}), not one image input; use --backend torch")
        if calibration is not None:
            model = _quantise_int8(model, calibration)
        try:
            ppp = ov.preprocess.PrePostProcessor(model)
            ppp.input().tensor().set_layout(ov.Layout("NHWC"))
            ppp.input().model().set_layout(ov.Layout("NCHW"))
            self.compiled = openvino_core().compile_model(ppp.build(), "CPU", {
                "INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": "f32"})
        except RuntimeError as e:  # OpenVINO's C++ checks surface as RuntimeError
            raise ValueError(f"OpenVINO cannot compile {type(net).__name__} ({str(e).strip().splitlines()[-1]}); "
                             "use --backend torch") from e
        self._request = self.compiled.create_infer_request()
        self._output = self.compiled.output(0)

    def convolution_precisions(self) -> dict[str, int]:
        """How many convolutions the compiled network runs in each precision (``{'f32': 19}``;
        quantised: ``{'u8': 19}``), as OpenVINO's runtime model reports them."""
        out: dict[str, int] = {}
        for op in self.compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) == "Convolution":
                p = info["runtimePrecision"].astype(str)
                out[p] = out.get(p, 0) + 1
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.detach().permute(0, 2, 3, 1).contiguous().float().numpy()  # NHWC (no copy if channels_last)
        return torch.from_numpy(self._request.infer({0: a})[self._output])


def _convert_openvino(ov, net: torch.nn.Module, in_channels: int):
    """``openvino.convert_model`` of ``net`` (traced in memory) with dynamic batch and tile size;
    its errors, which have no common base class, as ValueError."""
    try:
        with warnings.catch_warnings():  # OpenVINO traces with torch.jit.trace, which torch deprecates
            warnings.simplefilter("ignore", FutureWarning)
            return ov.convert_model(net.eval(), example_input=torch.zeros(1, in_channels, 64, 64),
                                    input=[ov.PartialShape([-1, in_channels, -1, -1])])
    except Exception as e:
        raise ValueError(f"OpenVINO cannot convert {type(net).__name__} ({str(e).strip().splitlines()[-1]}); "
                         "use --backend torch") from e


def _input_names(model) -> str:
    return "; ".join(", ".join(sorted(i.get_names())) or "unnamed" for i in model.inputs)


def _same_outputs(net: torch.nn.Module, ov_net: torch.nn.Module, multiple: int, atol: float = 1e-4,
                  in_channels: int = 3) -> None:
    """Raise ValueError unless the compiled network gives the torch network's logits (within
    ``atol``) on a fixed probe batch: ``--backend auto`` only picks a runtime that is exact (a
    network whose ``forward`` leaves torch, e.g. through NumPy, traces into constants)."""
    size = 2 * max(32, multiple)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, in_channels, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = net.eval()(x).float()
        got = ov_net(x)
    if got.shape != ref.shape or not torch.allclose(got, ref, atol=atol, rtol=0):
        diff = "shape " + str(tuple(got.shape)) if got.shape != ref.shape else f"max |d| {float((got - ref).abs().max()):.2g}"
        raise ValueError(f"OpenVINO's output differs from torch's on a probe batch ({diff})")


def _quantise_int8(model, calibration: np.ndarray):
    """NNCF post-training INT8 quantisation of an OpenVINO model with NCHW input, its activation
    ranges from ``calibration`` (N, H, W, C) float32, one tile per calibration step."""
    try:
        import nncf
    except ImportError as e:
        raise ValueError("--backend openvino-int8 needs the nncf package: pip install 'wsiseg[openvino]'") from e
    nncf.set_log_level(logging.ERROR)
    x = np.ascontiguousarray(np.asarray(calibration, np.float32).transpose(0, 3, 1, 2))
    data = nncf.Dataset([x[i:i + 1] for i in range(len(x))])
    # NNCF draws progress bars on the console (rich): kept out of wsiseg's output
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return nncf.quantize(model, data, subset_size=len(x), preset=nncf.QuantizationPreset.PERFORMANCE)


TTA_MODES = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, False), (2, True)),  # identity, h-flip, 180 deg, v-flip
    "d4": tuple((k, f) for f in (False, True) for k in range(4)),  # the 8 rotations x flips
}


class TestTimeAugmentation(torch.nn.Module):
    """Test-time augmentation: the network on each rotation (multiples of 90 degrees) and flip of
    the batch, each output turned back, and the activated probabilities averaged. ``forward``
    returns logits whose activation is that mean: ``logit(mean p)`` for sigmoid outputs (p clamped
    to [eps, 1 - eps]) and ``log(mean p)`` for softmax outputs. Square inputs only (tiles).

    ``mode``: ``flips`` (identity, horizontal and vertical flips, 180 degrees: 4 passes) or ``d4``
    (all 8 symmetries of the square). The network's cost grows by that factor."""

    def __init__(self, net: torch.nn.Module, mode: str, activation: str = "sigmoid", eps: float = 1e-6):
        super().__init__()
        if mode not in TTA_MODES or mode == "none":
            raise ValueError(f"unknown test-time augmentation {mode!r}; use flips or d4 (or none)")
        self.net = net
        self.ops = TTA_MODES[mode]
        self.softmax = activation == "softmax"
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"test-time augmentation needs square inputs, got {tuple(x.shape[-2:])}")
        acc = None
        for k, flip in self.ops:
            y = x.flip(-1) if flip else x
            y = torch.rot90(y, k, (-2, -1)) if k else y
            z = self.net(y).float()
            z = torch.rot90(z, -k, (-2, -1)) if k else z
            z = z.flip(-1) if flip else z
            p = torch.softmax(z, dim=1) if self.softmax else torch.sigmoid(z)
            acc = p if acc is None else acc.add_(p)
        p = acc.div_(len(self.ops)).clamp_(self.eps, 1 - self.eps)
        return torch.log(p) if self.softmax else torch.logit(p)


def _out_array(out: np.ndarray | None, shape: tuple) -> np.ndarray:
    """``out`` checked to be a C-contiguous float32 array of ``shape``, or a new one."""
    if out is None:
        return np.empty(shape, np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 {shape}, got {out.dtype} {out.shape}")
    return out


def _check_options(tta: str, backend: str) -> None:
    if tta not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {tta!r}; use none, flips or d4")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use {' or '.join(BACKENDS)}")


class Predictor:
    """Runs a :class:`LoadedModel` on tiles.

    Input: (N, T, T, 3) uint8 RGB. Output: (N, C, T, T) float32 probabilities (sigmoid or
    softmax as the sidecar says), or probabilities times a (T, T) ``weight`` (the blending window)
    into an optional preallocated ``out``. The batch is normalised on the device and fed
    channels_last (NHWC memory viewed as NCHW, no copy), which is about 1.5x faster on CPU than
    NCHW. On CPU the normalisation is a table look-up (:meth:`normalise`: the same bits as the
    tensor ops, without their per-element broadcasting over 3 channels), and the activation and
    the window multiply run on one thread (the multiply fused with the NHWC -> NCHW copy of the
    output). A network whose output repeats one map over the classes (an ``expand``, stride 0:
    e.g. the I/O benchmark's stand-in network) has its activation computed once per map.
    ``tta``: ``flips`` or ``d4`` average the probabilities over 4 or 8 flips/rotations of each
    tile (:class:`TestTimeAugmentation`), at 4 or 8 times the network's cost.
    :meth:`with_stain` gives the predictor for one slide whose tiles first go through that
    slide's stain transform (:mod:`wsiseg.stain`), on any backend (the OpenVINO network gets the
    transformed, normalised batch).
    ``backend``: ``torch`` (eager) or, on the CPU, ``openvino`` (:class:`OpenVINONet`: the same
    weights compiled by OpenVINO; everything around the network is unchanged) or
    ``openvino-int8`` (the same, quantised to INT8 on 64 tissue tiles of the bundled sample slide
    at the model's resolution, :func:`calibration_tiles`; 14-18 s once per predictor on 2 cores).
    ``auto`` (the command line's default): ``openvino`` on the CPU when the package is installed
    and the network converts, else ``torch``; :attr:`backend` is the one chosen and
    :attr:`backend_reason` says why (both go into ``summary.json``). INT8 is never chosen
    automatically.
    """

    def __init__(self, model: LoadedModel, device: str = "auto", threads: int | None = None, tta: str = "none",
                 backend: str = "torch"):
        self.model = model
        self.device = resolve_device(device)
        _check_options(tta, backend)
        if backend not in ("torch", "auto") and self.device.type != "cpu":
            raise ValueError(f"--backend {backend} runs on the CPU; use --device cpu (or the torch backend on CUDA)")
        self.tta = tta
        self.backend_requested = backend
        self.backend_reason = "requested"
        if backend == "auto":
            if self.device.type != "cpu":
                backend, self.backend_reason = "torch", f"auto: torch on {self.device.type}"
            elif not openvino_available():
                backend, self.backend_reason = "torch", "auto: openvino is not installed"
            else:
                backend, self.backend_reason = "openvino", "auto: openvino on the CPU"
        self.backend = backend
        if self.device.type == "cpu":
            torch.set_num_threads(threads or os.cpu_count() or 1)
        self._mean = torch.tensor(model.mean, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(model.std, device=self.device).view(1, 3, 1, 1) * 255
        # (v - mean) / std of every byte value v, per channel, by the same float32 tensor ops
        v = torch.arange(256, dtype=torch.float32).view(256, 1)
        lut = (v - self._mean.cpu().view(1, 3)) / self._std.cpu().view(1, 3)
        self._lut = np.ascontiguousarray(lut.numpy().reshape(1, 256, 3))
        net = fold_batchnorm(model.network)
        if backend != "torch":
            cal = self.normalise(calibration_tiles(model.mpp)) if backend == "openvino-int8" else None
            try:
                ov_net = OpenVINONet(net, torch.get_num_threads(), calibration=cal)
                if self.backend_requested == "auto":
                    _same_outputs(net, ov_net, model.input_multiple)
                net = ov_net
            except ValueError as e:
                if self.backend_requested != "auto":
                    raise
                self.backend, self.backend_reason = "torch", f"auto: torch ({e})"
        if tta != "none":
            net = TestTimeAugmentation(net, tta, model.activation)
        self.net = net.to(self.device).to(memory_format=torch.channels_last).eval()
        self.amp = self.device.type == "cuda"
        self._weight = None  # (window array, its copy on the device), see _device_weight
        self.stain = None  # the slide's StainTransform (wsiseg.stain), see with_stain
        self._stain = None  # its tensors on the device

    def with_stain(self, transform) -> "Predictor":
        """This predictor for one slide whose tiles go through ``transform`` (a
        :class:`wsiseg.stain.StainTransform`, fitted once for the slide) before the input
        normalisation, on the device: a shallow copy sharing the network. ``None`` or an identity
        transform: this predictor itself (whose inputs are normalised as before, bit for bit)."""
        if transform is None or transform.identity:
            return self
        p = copy.copy(self)
        p.stain, p._stain = transform, transform.on(self.device)
        return p

    def _device_weight(self, weight: np.ndarray) -> torch.Tensor:
        """The blending window on the device (copied once per window array)."""
        if self._weight is None or self._weight[0] is not weight:
            self._weight = (weight, torch.as_tensor(np.asarray(weight, np.float32), device=self.device))
        return self._weight[1]

    @property
    def channels(self) -> list[str]:
        return self.model.classes

    def normalise(self, tiles: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, H, W, 3) float32 (v - 255 mean) / (255 std) per channel: a
        table of the 256 x 3 values computed by the tensor ops, looked up in one OpenCV pass, so
        bit for bit what ``(x.float() - mean) / std`` gives on the batch."""
        n, h, w, c = tiles.shape
        x = cv2.LUT(np.ascontiguousarray(tiles).reshape(n * h, w, c), self._lut)
        return x.reshape(n, h, w, c)

    def inputs(self, tiles: np.ndarray, torch_input: bool = False) -> torch.Tensor:
        """(N, T, T, 3) uint8 tiles -> the network's input: (N, 3, T, T) float32 in channels_last
        memory, on the device, normalised (v - 255 mean) / (255 std); with the slide's stain
        transform (:meth:`with_stain`) first, by tensor ops on the device (on the CPU by OpenCV's
        kernels on the batch, unless ``torch_input``: :meth:`wsiseg.stain.DeviceStain.cpu`). Without one,
        ``torch_input`` normalises with tensor ops on the device (the batch copied there from
        pinned memory), else with the CPU table (:meth:`normalise`): the same bits."""
        if self._stain is not None and self.device.type == "cpu" and not torch_input:  # OpenCV's kernels
            mean, std = self._mean.view(3).numpy(), self._std.view(3).numpy()
            return torch.from_numpy(self._stain.cpu(tiles, mean, std)).permute(0, 3, 1, 2)
        if self._stain is not None or torch_input:
            x = torch.from_numpy(np.ascontiguousarray(tiles))
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
            if self._stain is not None:
                return self._stain(x).sub_(self._mean.view(3)).div_(self._std.view(3)).permute(0, 3, 1, 2)
            x = x.permute(0, 3, 1, 2).float()  # NHWC memory = channels_last
            return (x - self._mean) / self._std
        return torch.from_numpy(self.normalise(tiles)).permute(0, 3, 1, 2)  # channels_last view

    def _logits(self, tiles: np.ndarray, torch_input: bool):
        """(the float32 logits to activate: (N, C, T, T), or (N, 1, T, T) when the network repeats
        one map over the classes; the output shape (N, C, T, T)). ``torch_input``: normalise with tensor ops
        on the device (the batch copied there from pinned memory) instead of the CPU table."""
        t = tiles.shape[1]
        if t % self.model.input_multiple:
            raise ValueError(f"tile size {t} is not a multiple of {self.model.input_multiple}, which the model needs")
        x = self.inputs(tiles, torch_input)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            logits = self.net(x)
        logits = logits.float()
        # one map repeated over the classes (stride 0): its sigmoid once (softmax needs them all)
        once = (logits.dim() == 4 and logits.shape[1] > 1 and logits.stride(1) == 0
                and self.model.activation != "softmax")
        z = logits[:, :1].contiguous() if once else logits  # (the map may be a strided view)
        return z, (logits.shape[0], logits.shape[1]) + tuple(logits.shape[2:])

    def _activate(self, z: torch.Tensor, weight: np.ndarray | None) -> torch.Tensor:
        probs = torch.softmax(z, dim=1) if self.model.activation == "softmax" else torch.sigmoid(z)
        return probs if weight is None else probs * self._device_weight(weight)

    @torch.inference_mode()
    def on_device(self, tiles: np.ndarray, weight: np.ndarray | None = None) -> torch.Tensor:
        """Probabilities (x ``weight``) of (N, T, T, 3) uint8 tiles as an (N, C, T, T) float32
        tensor left on the predictor's device, for blending there
        (:class:`wsiseg.blend.DeviceChunkBlender`)."""
        z, shape = self._logits(tiles, torch_input=True)
        return self._activate(z, weight).expand(shape).contiguous()

    @torch.inference_mode()
    def probabilities(self, tiles: np.ndarray) -> np.ndarray:
        """Probabilities (N, C, T, T) float32 of (N, T, T, 3) uint8 tiles on the CPU, as the
        network left them: its output in any memory layout (channels_last strides, or one map
        broadcast over the classes as a read-only view), for callers that weight or copy it tile
        by tile. :meth:`__call__` gives a C-contiguous array."""
        if self.device.type != "cpu":
            raise ValueError("Predictor.probabilities is for the CPU; on a GPU use __call__ or on_device")
        z, shape = self._logits(tiles, torch_input=False)
        with _one_thread(z.numel()):
            p = self._activate(z, None).numpy()
        return p if p.shape == shape else np.broadcast_to(p, shape)

    def whole_image(self, image: np.ndarray) -> np.ndarray:
        """(C, H, W) float32 probabilities of one (H, W, 3) uint8 image at the model's resolution,
        in one forward pass (padded to a square multiple of the model's input multiple)."""
        h, w = image.shape[:2]
        return self(pad_to_multiple(image, self.model.input_multiple, square=True)[None])[0][:, :h, :w]

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray, weight: np.ndarray | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
        """Probabilities (N, C, T, T) float32 of (N, T, T, 3) uint8 tiles; with ``weight`` (T, T)
        float32, probabilities x weight (the same float32 products as multiplying afterwards).
        ``out``: a C-contiguous (N, C, T, T) float32 array to write into (returned)."""
        if self.device.type != "cpu":
            # on the GPU: activation and window there, then one copy into ``out`` (NCHW)
            probs = self.on_device(tiles, weight)
            out = _out_array(out, tuple(probs.shape))
            torch.from_numpy(out).copy_(probs)
            return out
        p = self.probabilities(tiles)  # any strides (channels_last, or one channel for all)
        if out is None and weight is None and p.flags.c_contiguous:
            return p  # already NCHW
        out = _out_array(out, p.shape)
        if weight is None:
            np.copyto(out, p)  # NCHW, whatever the network's layout
        else:
            np.multiply(p, weight, out=out)
        return out


@dataclass(frozen=True)
class PredictorSpec:
    """What builds a :class:`Predictor`, as one frozen, picklable and hashable value: it goes whole
    to Dask workers (which build and cache one predictor per spec) and to bench's child
    processes, instead of five arguments passed down by hand. ``model`` is a registry name or a
    path (``None``: the default model); a relative path is made absolute by :meth:`portable`."""

    model: str | None = None
    device: str = "auto"
    threads: int | None = None
    tta: str = "none"
    backend: str = "auto"

    def __post_init__(self):
        _check_options(self.tta, self.backend)

    @classmethod
    def from_args(cls, args, **overrides) -> "PredictorSpec":
        """The spec of a parsed command line (``--model``, ``--device``, ``--threads``, ``--tta``,
        ``--backend``; a flag a command lacks keeps its default)."""
        fields = {k: getattr(args, k) for k in ("model", "device", "threads", "tta", "backend") if hasattr(args, k)}
        if isinstance(fields.get("model"), list):  # (eval takes several models)
            fields.pop("model")
        return cls(**{**fields, **overrides})

    def portable(self) -> "PredictorSpec":
        """The same spec with a model path made absolute (for a worker in another directory)."""
        m = self.model
        if m is not None and (Path(m).exists() or Path(m + ".safetensors").exists()):
            return replace(self, model=str(Path(m).resolve()))
        return self

    def build(self, model: LoadedModel | None = None) -> Predictor:
        """A predictor for this spec (``model``: the spec's model already loaded)."""
        if model is None:
            from wsiseg.models.registry import load_model

            model = load_model(self.model)
        return Predictor(model, self.device, threads=self.threads, tta=self.tta, backend=self.backend)

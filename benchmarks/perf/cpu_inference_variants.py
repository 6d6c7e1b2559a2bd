"""Which way of running the U-Net is fastest on this CPU? Same weights, same real tiles.

    python benchmarks/perf/cpu_inference_variants.py --json benchmarks/results/cpu_inference_variants.json

Variants: eager NCHW; eager channels_last; BatchNorm folded into the convolutions (wsiseg's Predictor) +
channels_last; TorchScript frozen with ``optimize_for_inference`` (oneDNN fusions) + channels_last;
OpenVINO on the folded network fed NHWC (``wsiseg run --backend openvino``; when ``openvino`` is
installed) and the same quantised to INT8 by NNCF (``--backend openvino-int8``; when ``nncf`` is
installed too: its max abs difference is the quantisation's, not rounding); ONNX Runtime on the folded network (when ``onnxruntime`` and ``onnx`` are installed; for
reference, not a wsiseg backend).
Each is checked against eager NCHW (max abs difference of the probabilities) before timing.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch


def timeit(fn, x, reps: int) -> float:
    for _ in range(2):
        fn(x)
    t = time.perf_counter()
    for _ in range(reps):
        fn(x)
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from wsiseg.cli import SAMPLE
    from wsiseg.models import load_model
    from wsiseg.slide import ScaledView, open_slide

    m = load_model(a.model)
    view = ScaledView.create(open_slide(SAMPLE), m.mpp)
    tiles = np.stack([view.read(1000 + 128 * (i // 4), 500 + 128 * (i % 4), 256, 256) for i in range(a.batch_size)])
    mean = torch.tensor(m.mean).view(1, 3, 1, 1)
    std = torch.tensor(m.std).view(1, 3, 1, 1)
    x_cl = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255 - mean) / std  # channels_last view
    x_nchw = x_cl.contiguous()
    net = m.network.eval()
    from wsiseg.bench import machine

    res = {"batch_size": a.batch_size, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "machine": machine(), "variants": {}}
    with torch.inference_mode():
        ref = torch.sigmoid(net(x_nchw))
        variants = {"eager_nchw": (net, x_nchw)}
        cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        variants["eager_channels_last"] = (cl, x_cl)
        from wsiseg.predict import fold_batchnorm

        fused = fold_batchnorm(net).to(memory_format=torch.channels_last)  # what wsiseg's Predictor runs
        variants["bn_folded_channels_last"] = (fused, x_cl)
        with torch.no_grad():
            traced = torch.jit.trace(copy.deepcopy(net).to(memory_format=torch.channels_last), x_cl)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        variants["torchscript_frozen_channels_last"] = (frozen, x_cl)
        try:  # wsiseg's --backend openvino (needs pip install 'wsiseg[openvino]')
            from wsiseg.predict import OpenVINONet

            variants["openvino_bn_folded_nhwc"] = (OpenVINONet(fold_batchnorm(net), torch.get_num_threads()), x_cl)
            import openvino

            res["openvino"] = openvino.__version__
            try:  # wsiseg's --backend openvino-int8: the same, quantised by NNCF on the sample slide's tiles
                from wsiseg.predict import Predictor, calibration_tiles

                cal = Predictor(m, "cpu").normalise(calibration_tiles(m.mpp))
                variants["openvino_int8_nhwc"] = (OpenVINONet(fold_batchnorm(net), torch.get_num_threads(),
                                                              calibration=cal), x_cl)
            except ValueError as e:
                print(f"openvino-int8: skipped ({e})")
        except ValueError as e:
            print(f"openvino: skipped ({e})")
        try:  # ONNX Runtime on the same folded network, for reference (not a wsiseg backend)
            import tempfile

            import onnxruntime as ort

            with tempfile.TemporaryDirectory() as tmp:
                torch.onnx.export(fold_batchnorm(net), (x_nchw,), f"{tmp}/m.onnx", input_names=["x"], dynamo=False,
                                  dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
                so = ort.SessionOptions()
                so.intra_op_num_threads, so.inter_op_num_threads = torch.get_num_threads(), 1
                sess = ort.InferenceSession(f"{tmp}/m.onnx", so, providers=["CPUExecutionProvider"])
            variants["onnxruntime_bn_folded_nchw"] = (
                lambda x: torch.from_numpy(sess.run(None, {"x": x.contiguous().numpy()})[0]), x_nchw)
        except ImportError as e:
            print(f"onnxruntime: skipped ({e})")
        for name, (fn, x) in variants.items():
            diff = float((torch.sigmoid(fn(x)) - ref).abs().max())
            dt = timeit(fn, x, a.reps)
            res["variants"][name] = {"tiles_per_second": round(a.batch_size / dt, 2), "max_abs_diff": diff}
            print(f"{name:36s} {a.batch_size / dt:8.2f} tiles/s  max|dp| {diff:.2e}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

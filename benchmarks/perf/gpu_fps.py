"""Frames per second of the zoo's networks alone, at seed 000's input size (512 x 512).

Seed 000 (Kasturi et al.) reports its modified U-Net (U-Net with BatchNorm, 64 channels at full
resolution, 4 poolings) at 129.525 images/s on an RTX 3060 (their Table III, batch size 3 in
training; the inference batch is not stated). This script times the same architecture
(``unet_bn``, base 64, depth 4) and the other zoo networks in one run, on one device:

* forward only on a batch already on the device (CUDA events around each forward, after
  warm-up; the median of the repeats), float32 (cuDNN's default TF32 convolutions) and bfloat16
  autocast, channels_last memory;
* batch sizes 1, 3 and 16; images/s = batch / median forward time.

Weights are random (He init, BatchNorm in eval mode): timing only, which does not depend on the
values. Inputs are normal random numbers (never zeros: zeros can run faster than real data).

    python benchmarks/perf/gpu_fps.py --json benchmarks/results/gpu_fps_h100.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from wsiseg.models.registry import build_model  # noqa: E402

NETWORKS = {
    "seed000_modified_unet (unet_bn base 64)": ("unet_bn", {"base": 64, "depth": 4}),
    "wsiseg default (unet_bn base 16, 5 ch)": ("unet_bn", {"base": 16, "depth": 4, "out_channels": 5}),
    "unet_timm resnet50": ("unet_timm", {"encoder": "resnet50"}),
    "use_net seresnet50": ("use_net", {}),
    "fpn_rakhlin resnet34": ("fpn_rakhlin", {}),
}


def time_forward(net, x, amp: bool, warmup: int, reps: int) -> float:
    """Median seconds per forward of ``net(x)``."""
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else torch.autocast("cuda", enabled=False)
    times = []
    with torch.inference_mode(), ctx:
        for _ in range(warmup):
            net(x)
        torch.cuda.synchronize()
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            net(x)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000)
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batches", default="1,3,16")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_fps: no CUDA GPU; this benchmark times GPU forwards only", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(0)
    rows = []
    for label, (arch, kw) in NETWORKS.items():
        net = build_model(arch, **kw).eval().to(dev, memory_format=torch.channels_last)
        params = sum(t.numel() for t in net.parameters())
        for bs in [int(b) for b in a.batches.split(",")]:
            g = torch.Generator(device=dev).manual_seed(bs)
            x = torch.randn(bs, 3, a.size, a.size, device=dev, generator=g).to(memory_format=torch.channels_last)
            for amp in (False, True):
                t = time_forward(net, x, amp, warmup=5, reps=a.reps)
                rows.append({"network": label, "architecture": arch, "arch_kwargs": kw, "params": params,
                             "batch": bs, "precision": "bf16 autocast" if amp else "fp32 (TF32 conv)",
                             "ms_per_batch": round(t * 1000, 3), "images_per_second": round(bs / t, 1)})
                print(f"{label:42s} batch {bs:3d} {rows[-1]['precision']:17s} "
                      f"{rows[-1]['ms_per_batch']:8.2f} ms  {rows[-1]['images_per_second']:9.1f} img/s", flush=True)
        del net
        torch.cuda.empty_cache()
    out = {
        "benchmark": "benchmarks/perf/gpu_fps.py", "input": [3, a.size, a.size], "reps": a.reps,
        "machine": {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 1024**3, 1),
                    "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                    "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")},
        "reference": {"seed000_modified_unet_fps": 129.525, "seed000_gpu": "RTX 3060 12 GB"},
        "rows": rows,
    }
    ref = [r for r in rows if r["network"].startswith("seed000")]
    if ref:
        best = max(ref, key=lambda r: r["images_per_second"])
        b1 = [r for r in ref if r["batch"] == 1 and r["precision"].startswith("fp32")]
        out["seed000_ratio_best"] = round(best["images_per_second"] / 129.525, 2)
        if b1:
            out["seed000_ratio_batch1_fp32"] = round(b1[0]["images_per_second"] / 129.525, 2)
        print(f"seed 000 modified U-Net: best {best['images_per_second']} img/s "
              f"({out['seed000_ratio_best']}x the paper's 129.5 on an RTX 3060)")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

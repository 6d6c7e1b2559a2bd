"""Plot tiles/s per stage from a `wsiseg bench --json` result (and a peer run, if given).

    python benchmarks/tools/plot_stages.py benchmarks/results/bench_sample_cpu_torch2141.json \
        --peer benchmarks/results/peer_tiatoolbox_cpu_torch2141.json \
        -o benchmarks/results/stages_tiles_per_second.png

Bars are the steady-state loop rate of each stage of the one bench run (reads + tile cutting;
the model alone on tensors of the tile shape; reads + blending + Zarr writing with an identity
model; the whole pipeline), on a log axis, with peak RSS written on each bar. With ``--peer``,
the peer JSON's two engines (same slide, model, tile and stride, one run) are added as a second
group. Every number drawn comes from the JSON files given; nothing is typed in here.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

STAGES = (
    ("read_only", "reads + tile cutting"),
    ("blend_write_only", "reads + blend + write\n(identity model)"),
    ("model_only", "model alone\n(compute ceiling)"),
    ("end_to_end", "whole pipeline"),
)


def _rate(stage: dict) -> float:
    return float(stage.get("loop_tiles_per_second") or stage["tiles_per_second"])


def plot(bench: dict, out: Path, peer: dict | None = None, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = bench["stages"]
    rows = [(label, _rate(stages[k]), stages[k].get("peak_rss_mb"), "#4c72b0")
            for k, label in STAGES if k in stages and "tiles_per_second" in stages[k]]
    if not rows:
        raise SystemExit("plot_stages: the bench JSON has no stage with tiles_per_second")
    if peer:
        pm = peer.get("model")
        pm = f"\n{pm if isinstance(pm, str) else pm.get('id', '')}" if pm else ""
        rows.append((f"wsiseg (peer run){pm}", float(peer["wsiseg_tiles_per_second"]), peer.get("wsiseg_peak_rss_mb"),
                     "#55a868"))
        rows.append((f"TIAToolbox{pm}", float(peer["tiatoolbox_tiles_per_second"]),
                     peer.get("tiatoolbox_peak_rss_mb"), "#c44e52"))
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4.2))
    xs = range(len(rows))
    bars = ax.bar(xs, [r[1] for r in rows], color=[r[3] for r in rows])
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [r[0] for r in rows], fontsize=8)
    ax.set_ylabel("tiles / s (steady-state loop)")
    for b, r in zip(bars, rows):
        txt = f"{r[1]:.1f}" + (f"\n{r[2]:.0f} MB" if r[2] else "")
        ax.annotate(txt, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    m = bench.get("machine", {})
    slide = Path(bench.get("slide", {}).get("path", "?")).name
    ax.set_title(title or f"{slide}, {bench.get('slide', {}).get('model', '')}, batch {bench.get('batch_size')}, "
                 f"{bench.get('device')} ({m.get('cpu', '?')}, {m.get('usable_cores', '?')} cores, "
                 f"torch {m.get('torch', '?')})", fontsize=9)
    ax.set_ylim(top=max(r[1] for r in rows) * 4)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", type=Path, help="JSON written by `wsiseg bench --json`")
    ap.add_argument("--peer", type=Path, default=None, help="JSON written by benchmarks/peers/peer_tiatoolbox.py")
    ap.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results/stages_tiles_per_second.png"))
    ap.add_argument("--title", default=None)
    a = ap.parse_args(argv)
    peer = json.loads(a.peer.read_text()) if a.peer else None
    print(plot(json.loads(a.bench.read_text()), a.out, peer, a.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

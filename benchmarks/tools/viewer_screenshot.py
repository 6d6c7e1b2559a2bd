"""The README's screenshot of `wsiseg view`: a run folder in headless Chromium, saved as a small PNG.

    wsiseg run --sample --instances -o /tmp/viewout
    python benchmarks/tools/viewer_screenshot.py /tmp/viewout -o docs/viewer.png

Serves OUT on a free loopback port, opens the page in Debian's Chromium through Playwright,
zooms to ``--box`` (slide level-0 px), turns on the ``--channel`` probability map, points at the
nucleus nearest the box's centre (so the read-out shows it) and saves the page as a 256-colour PNG.
"""
from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from wsiseg.viewer.server import ViewerServer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="a run folder or a folder of them")
    ap.add_argument("-o", "--output", default="docs/viewer.png")
    ap.add_argument("--box", default="900,1200,1360,1500", help="x0,y0,x1,y1 in slide level-0 px")
    ap.add_argument("--channel", type=int, default=0, help="probability channel to show")
    ap.add_argument("--size", default="1040x620", help="browser window, CSS px")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    x0, y0, x1, y1 = (float(v) for v in args.box.split(","))
    w, h = (int(v) for v in args.size.split("x"))
    srv = ViewerServer(Path(args.out), "127.0.0.1", 0)
    srv.start_thread()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": w, "height": h})
            page.goto(srv.url)
            idle = "window.wsisegView && window.wsisegView.idle()"
            page.wait_for_function(idle, timeout=60000)
            page.evaluate(f"wsisegView.show({x0}, {y0}, {x1}, {y1})")
            page.wait_for_function(idle, timeout=60000)
            page.click(f"#layer-map-{args.channel}")
            page.wait_for_function(idle, timeout=60000)
            run = next(iter(srv.runs.values()))
            nuc = run.nuclei
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            if nuc is not None and len(nuc):
                b = nuc.bbox
                i = int(np.argmin(((b[:, 0] + b[:, 2]) / 2 - cx) ** 2 + ((b[:, 1] + b[:, 3]) / 2 - cy) ** 2))
                cx, cy = float(b[i, 0] + b[i, 2]) / 2, float(b[i, 1] + b[i, 3]) / 2
            p = page.evaluate(f"wsisegView.toPage({cx}, {cy})")
            page.mouse.move(p["x"], p["y"])
            page.wait_for_function(f"document.getElementById('ro-xy').textContent !== '-' && {idle}", timeout=60000)
            png = page.screenshot()
            browser.close()
    finally:
        srv.shutdown()
        srv.server_close()
    im = Image.open(io.BytesIO(png)).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    im.save(args.output, optimize=True)
    print(f"{args.output}: {im.size[0]} x {im.size[1]}, {Path(args.output).stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()

"""Write each shipped segmentation model's training stain reference into its sidecar.

``wsiseg run --stain METHOD`` normalises a slide to the colours its model was trained on: the
sidecar's ``stain_reference`` (:func:`wsiseg.stain.training_references`: the median of every
method's fits to each training slide). Models trained from now on record it
themselves (``wsiseg train``); this script adds it to the models shipped before, from the same
training images their trainers loaded (their sidecars' split rules), and changes nothing else.

    python benchmarks/tools/stain_references.py [--data ../shared/data]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from wsiseg.models.registry import WEIGHTS_DIR
from wsiseg.stain import training_references
from wsiseg.train.datasets import load_consep, load_monusac, split_groups, split_monuseg, split_tnbc

MONUSEG_MODELS = ("unet-bn-monuseg-20x", "unet-bn-marker-monuseg-20x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data")
    a = p.parse_args(argv)
    data = Path(a.data)
    monuseg_train, _ = split_monuseg(data / "monuseg" / "train", 0.5)
    sets = {name: ([s.image for s in monuseg_train], f"the {len(monuseg_train)} MoNuSeg training images at 0.5 um/px")
            for name in MONUSEG_MODELS}
    # the joint nucleus + class model: MoNuSeg train, CoNSeP train (every 5th source image held
    # out), MoNuSAC train (every 4th slide held out), as wsiseg.train.multitask loads them
    consep, _ = split_groups(load_consep(data / "consep" / "train", 0.5), 5)
    monusac, _ = split_groups(load_monusac(data / "monusac", 0.5), 4)
    slides: dict[str, list] = {}
    for s in consep + monusac:  # tiles by source image / slide, as the trainer groups them
        slides.setdefault(s.group, []).append(s.image)
    imgs = [s.image for s in monuseg_train] + list(slides.values())
    sets["unet-bn-nuclei-classes-20x"] = (imgs, f"the training images at 0.5 um/px: {len(monuseg_train)} MoNuSeg "
                                                f"images, {len(consep)} CoNSeP and {len(monusac)} MoNuSAC tiles "
                                                f"from {len(slides)} slides")
    # the default model: the same, with TNBC's training patients (05 and 11 held out)
    tnbc, _ = split_tnbc(data / "tnbc" / "train", 0.5)
    sets["lite0-unet-joint-20x"] = ([s.image for s in monuseg_train + tnbc] + list(slides.values()),
                                    f"the training images at 0.5 um/px: {len(monuseg_train)} MoNuSeg and {len(tnbc)} "
                                    f"TNBC images, {len(consep)} CoNSeP and {len(monusac)} MoNuSAC tiles from "
                                    f"{len(slides)} slides")
    for name, (images, origin) in sets.items():
        path = WEIGHTS_DIR / f"{name}.json"
        if not path.is_file():  # a model no longer shipped
            continue
        meta = json.loads(path.read_text())
        meta["stain_reference"] = training_references(images, origin)
        path.write_text(json.dumps(meta, indent=2) + "\n")
        print(f"{path.name}: stain_reference from {origin}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

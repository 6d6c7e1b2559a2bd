"""The seam test (tests/test_blend.py: a 600 px MoNuSeg breast crop against the same crop shifted by 96 px, Hann at 50% overlap) on the default model, with torch and OpenVINO."""
import numpy as np
import sys
sys.path.insert(0, ".")
from tests.test_blend import _shift_difference
from tests.conftest import MONUSEG
from PIL import Image
from pathlib import Path
import tempfile
from wsiseg.models import load_model
from wsiseg.predict import Predictor
from wsiseg.pipeline import RunConfig
img = np.asarray(Image.open(sorted((MONUSEG / "images").glob("*.png"))[0]).convert("RGB"))
for backend in ("torch", "openvino"):
    pred = Predictor(load_model(sys.argv[1] if len(sys.argv) > 1 else None), "cpu", backend=backend)
    d, mb = _shift_difference(Path(tempfile.mkdtemp()), pred, img[:600, :600], RunConfig.of(mpp=pred.model.mpp, tissue=False), 96, "hann")
    print(backend, pred.backend, d.mean(), np.quantile(d, 0.99), (mb > 0.5).mean())

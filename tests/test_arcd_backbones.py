"""The thesis's other D backbones (spec §2.4): SegNet, PSPNet, DeepLabV3+.

Their sizes at the published widths, output shapes for ARCD and the plain baselines, the two
export-driven choices (mask unpooling, matrix adaptive pooling) against torch's own ops, ONNX
parity in a real ONNX Runtime session, the config errors, and a short training run per backbone
that exports to a bundle.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch", reason="torch is needed for the offline ARCD code (pip install .[train])")
pytest.importorskip("onnx", reason="onnx is needed for the ARCD export")

import torch.nn.functional as F  # noqa: E402

from export.arcd.backbones import (ResNetEncoder, SegNetDiscriminator, _pool_with_mask,  # noqa: E402
                                   _unpool_with_mask, adaptive_average, input_multiple)
from export.arcd.torch_model import ARCDInference, count_parameters  # noqa: E402
from inspector.errors import ConfigError  # noqa: E402
from test_arcd_neu import CLASSES, neu_folder  # noqa: E402

torch.set_num_threads(2)

SMALL = {"segnet": {"d_depth": 3}, "pspnet": {"d_resnet_layers": [1, 1, 1, 1]},
         "deeplabv3plus": {"d_resnet_layers": [1, 1, 1, 1]}}


def _cfg(backbone: str, reconstruction: bool = True, **model):
    from export.arcd.train import _validate

    m = {"in_channels": 1, "classes": CLASSES, "tile": [64, 64], "r_base_width": 2, "r_depth": 3,
         "d_base_channels": 4, "d_backbone": backbone, "reconstruction": reconstruction,
         **SMALL[backbone], **model}
    return _validate({"model": m, "stage1": {"steps": 1}, "stage2": {"steps": 1}}, "test.yaml")


def test_published_sizes():
    # ResNet-50 without its classifier: 25,557,032 - 2,049,000 (fc) parameters
    assert count_parameters(ResNetEncoder(3, 64, (3, 4, 6, 3))) == 23_508_032
    # SegNet on VGG16 for 12 classes (the SegNet paper's CamVid net: 29.5 M)
    assert count_parameters(SegNetDiscriminator(3, 12, 64, depth=5)) == 29_486_988
    assert [input_multiple(b, 5) for b in ("unet", "segnet", "pspnet", "deeplabv3plus")] == [16, 32, 8, 16]
    with pytest.raises(ValueError, match="unknown D backbone 'fcn'"):
        input_multiple("fcn", 5)


@pytest.mark.parametrize("size", [28, 8, 7, 14])
def test_matrix_pooling_is_adaptive_average_pooling(size):
    x = torch.rand(2, 3, size, size + 3)
    for bins in (1, 2, 3, 6):
        torch.testing.assert_close(adaptive_average(x, bins), F.adaptive_avg_pool2d(x, bins))


def test_unpooling_returns_values_to_the_maxima():
    x = torch.randperm(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)  # no ties
    pooled, where = _pool_with_mask(x)
    ref, idx = F.max_pool2d(x, 2, return_indices=True)
    torch.testing.assert_close(pooled, ref)
    torch.testing.assert_close(_unpool_with_mask(pooled, where), F.max_unpool2d(ref, idx, 2))


@pytest.mark.parametrize("backbone", ["segnet", "pspnet", "deeplabv3plus"])
@pytest.mark.parametrize("reconstruction", [True, False])
def test_backbone_shapes_for_arcd_and_the_plain_baseline(backbone, reconstruction):
    from export.arcd.train import build_models

    r, d = build_models(_cfg(backbone, reconstruction).model)
    assert d.in_channels == (2 if reconstruction else 1)
    model = ARCDInference(r, d).eval()
    for h, w in ((64, 64), (96, 160)):
        with torch.no_grad():
            rec, probs = model(torch.rand(2, 1, h, w))
        assert rec.shape == (2, 1, h, w) and probs.shape == (2, 4, h, w)
        torch.testing.assert_close(probs.sum(1), torch.ones(2, h, w))


@pytest.mark.parametrize("backbone", ["segnet", "pspnet", "deeplabv3plus"])
def test_backbone_exports_with_parity(backbone, tmp_path):
    from export.arcd.train import build_models
    from export.onnx_export import check_parity, export_onnx

    r, d = build_models(_cfg(backbone).model)
    model = ARCDInference(r, d)
    model.train()
    with torch.no_grad():  # running statistics away from their initial values, so folding matters
        for _ in range(3):
            model(torch.rand(4, 1, 64, 64) * 2)
    model.eval()
    path = tmp_path / f"{backbone}.onnx"
    export_onnx(model, path, 1, (64, 64))
    x = {"random": np.random.default_rng(0).random((3, 1, 64, 64), dtype=np.float32)}
    diff = check_parity(model, path, x)["random"]
    assert diff["probs"] <= 1e-4 and diff["reconstruction"] <= 1e-4


def test_backbone_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="tile \\[72, 72\\] must be a multiple of 16"):
        _cfg("deeplabv3plus", tile=[72, 72])
    with pytest.raises(ConfigError, match="calm .* d_backbone 'segnet'"):
        _cfg("segnet", calm=True)
    with pytest.raises(ConfigError, match="d_backbone"):
        _cfg("segnet", d_backbone="fcn")
    with pytest.raises(ConfigError, match="d_resnet_layers"):
        _cfg("pspnet", d_resnet_layers=[3, 4, 6])
    from export.arcd.train import _validate

    raw = {"model": {"in_channels": 1, "classes": CLASSES, "tile": [64, 64], "r_base_width": 2,
                     "r_depth": 3, "d_base_channels": 2, "d_backbone": "deeplabv3plus"},
           "data": {"source": "neu-seg", "root": "x", "train_crop": [40, 40]}}
    with pytest.raises(ConfigError, match="data.train_crop \\[40, 40\\] must be a multiple of 16"):
        _validate(raw, "test.yaml")


@pytest.mark.parametrize("backbone", ["segnet", "pspnet", "deeplabv3plus"])
def test_backbone_trains_and_exports_a_bundle(backbone, tmp_path):
    from export.arcd.train import train
    from export.onnx_export import export_bundle
    from inspector.bundle import load_bundle

    root = neu_folder(tmp_path / "neu", n=16)
    cfg = {"name": f"tiny-{backbone}", "threads": 1, "log_every": 1,
           "model": {"in_channels": 1, "classes": CLASSES, "tile": [64, 64], "r_base_width": 2,
                     "r_depth": 3, "d_base_channels": 4, "d_backbone": backbone, **SMALL[backbone]},
           "data": {"source": "neu-seg", "root": str(root), "calib_images": 2, "normal_patch": 32,
                    "train_crop": [32, 32], "crops_per_frame": 2},
           "stage1": {"steps": 2, "batch_size": 2},
           "stage2": {"steps": 16, "batch_size": 4, "lr": 0.005, "focal_alpha": "balanced"},
           "evaluation": {"threshold_candidates": [0.5]}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = train(path, tmp_path / "run")
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    losses = [v for _, v in ck["history"]["stage2"]]
    assert len(losses) == 16 and np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    bundle = load_bundle(export_bundle(run, tmp_path / "bundle"))
    assert bundle.spec.provenance["training_config"]["model"]["d_backbone"] == backbone

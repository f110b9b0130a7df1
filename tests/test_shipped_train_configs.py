"""Every training config shipped in configs/train loads through its own trainer's validator, so
a user who copies one never meets a key error the repository already had; the thesis-width
baseline stays the ARCD config with R switched off."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

TRAIN = Path(__file__).resolve().parents[1] / "configs" / "train"


def _loader(name: str):
    if name.startswith("clgan"):
        from export.clgan.train import load_config
    elif name.startswith("fuzzymask"):
        from export.fuzzymask.train import load_config
    elif name.startswith("defectgan"):
        from export.augment.defectgan.train import load_config
    elif name.startswith("anomalyalign"):
        from export.augment.anomalyalign.train import load_config
    else:
        from export.arcd.train import load_config
    return load_config


@pytest.mark.parametrize("path", sorted(TRAIN.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_training_config_validates(path):
    cfg = _loader(path.name)(path)
    assert cfg.name


def test_the_thesis_width_baseline_is_the_arcd_config_without_r():
    from export.arcd.train import load_config

    arcd = load_config(TRAIN / "arcd-neu-thesis-30.yaml").model_dump()
    unet = load_config(TRAIN / "arcd-neu-thesis-unet-30.yaml").model_dump()
    assert arcd["model"]["reconstruction"] and not unet["model"]["reconstruction"]
    assert (arcd["model"]["r_base_width"], arcd["model"]["d_base_channels"]) == (128, 64)
    for key in ("seed", "device", "data", "stage2", "evaluation"):
        assert unet[key] == arcd[key], key
    assert {k: v for k, v in unet["model"].items() if k != "reconstruction"} == \
        {k: v for k, v in arcd["model"].items() if k != "reconstruction"}

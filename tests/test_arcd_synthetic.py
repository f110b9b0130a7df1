"""ARCD stage 2 with generated pairs mixed in (``data.synthetic_root``, issue #9)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_arcd_neu import neu_folder

torch = pytest.importorskip("torch")

from export.arcd.data import FolderDataConfig, build_data  # noqa: E402
from export.arcd.simulation import SimulationConfig  # noqa: E402
from export.augment.dataset import PairWriter, labelled_subset  # noqa: E402


def synthetic_folder(root, n: int = 10, size: int = 64, level: int = 240):
    """Generated pairs in the NEU layout: bright images (so a test can tell them from the dark-
    defect real ones), a class-2 square each."""
    w = PairWriter(root, "testgen", config={"why": "test"})
    for _ in range(n):
        img = np.full((size, size), level, np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[20:40, 20:40] = 2
        w.add(img, mask, source="test")
    w.close()
    return root


def data_for(real, **kw):
    cfg = FolderDataConfig(source="neu-seg", root=str(real), calib_images=2, normal_patch=32,
                           train_crop=(32, 32), focus_prob=0.0, **kw)
    return build_data(cfg, tile=(32, 32), channels=1, mean=[0.0], std=[1.0],
                      simulation=SimulationConfig(clean_prob=0.0), stage1_length=4,
                      stage2_length=400, seed=0)


def test_a_share_of_stage2_frames_comes_from_the_generated_pairs(tmp_path):
    real = neu_folder(tmp_path / "neu", n=40)
    syn = synthetic_folder(tmp_path / "syn")
    data = data_for(real, synthetic_root=str(syn), synthetic_ratio=0.3)
    assert "mixed with 30% generated pairs" in data.description
    bright = [float(data.stage2[i]["image"].mean()) > 0.85 for i in range(300)]
    assert 0.2 < np.mean(bright) < 0.4
    # none at ratio 0; the real data alone without synthetic_root
    data0 = data_for(real, synthetic_root=str(syn), synthetic_ratio=0.0)
    assert not any(float(data0.stage2[i]["image"].mean()) > 0.85 for i in range(100))
    # synthetic_limit keeps the first pairs only
    limited = data_for(real, synthetic_root=str(syn), synthetic_limit=3)
    assert "3 of 10 images" in limited.description


def test_bad_synthetic_folders_are_errors_naming_the_key(tmp_path):
    real = neu_folder(tmp_path / "neu", n=20)
    with pytest.raises(ValueError, match="data.synthetic_root"):
        data_for(real, synthetic_root=str(tmp_path / "nope"))
    syn = synthetic_folder(tmp_path / "syn", n=2)
    man = json.loads((syn / "manifest.json").read_text())
    man["classes"] = ["background", "crack"]
    (syn / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="classes"):
        data_for(real, synthetic_root=str(syn))
    with pytest.raises(ValueError, match="synthetic_root is for source 'neu-seg'"):
        FolderDataConfig(source="magnetic-tile", root="x", synthetic_root=str(syn))


def test_pair_writer_checks_pairs_and_refuses_to_overwrite(tmp_path):
    w = PairWriter(tmp_path / "out", "g")
    with pytest.raises(ValueError, match="differ in size"):
        w.add(np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match="beyond"):
        w.add(np.zeros((8, 8), np.uint8), np.full((8, 8), 4, np.uint8))
    stem = w.add(np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8))
    assert stem.startswith("syn-g-")
    w.close()
    with pytest.raises(FileExistsError, match="manifest"):
        PairWriter(tmp_path / "out", "g")


def test_labelled_subset_is_the_one_arcd_trains_on(tmp_path):
    real = neu_folder(tmp_path / "neu", n=40)
    neu_folder(real, n=10, subset="test", first=1000)  # NEU-Seg's own test folder: never trained on
    sub = labelled_subset(real, 0.3, seed=0)
    data = data_for(real, label_fraction=0.3)
    assert f"{len(sub)} of" in data.description
    assert {e.category for e in sub.entries} == {"training"}


def test_measure_cli_reports_diversity_against_real_images(tmp_path):
    from conftest import run_cli

    real = neu_folder(tmp_path / "neu", n=12)
    syn = synthetic_folder(tmp_path / "syn", n=6)
    r = run_cli("augment", "measure", "--pairs", str(syn), "--reference", str(real),
                "--reference-split", "all", "--out", str(tmp_path / "m.json"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "m.json").read_text())
    # the generated images here are all the same flat image: no diversity at all
    assert res["generated"]["diversity"] == 0.0 and res["reference"]["diversity"] > 0
    assert res["ratio"] == 0.0
    r = run_cli("augment", "measure", "--pairs", str(tmp_path / "nope"))
    assert r.returncode == 2 and "--pairs" in r.stderr


# ----------------------------------------------------------------------------- ARCD's data, checked up front

CLASSES = ["background", "inclusion", "patches", "scratches"]


def tiny_neu_config(tmp_path, root, **data):
    """A 2 + 2-step ARCD config on ``root`` (tiny widths: seconds, not minutes)."""
    import yaml

    cfg = {"name": "tiny", "threads": 1, "log_every": 1,
           "model": {"in_channels": 1, "classes": CLASSES, "tile": [64, 64], "r_base_width": 2,
                     "r_depth": 3, "d_base_channels": 2, "d_depth": 3},
           "data": {"source": "neu-seg", "root": str(root), "calib_images": 1, "val_images": 2,
                    "normal_patch": 32, "train_crop": [32, 32], **data},
           "stage1": {"steps": 2, "batch_size": 2},
           "stage2": {"steps": 2, "batch_size": 2},
           "evaluation": {"threshold_candidates": [0.5]}}
    path = tmp_path / "arcd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def _val_stem(n: int) -> str:
    from inspector.evaluation.datasets import split_of

    return next(f"{i:06d}" for i in range(n) if split_of(f"{i:06d}") == "val")


@pytest.mark.parametrize("classes", [["background", "a", "b"],
                                     ["background", "scratches", "patches", "inclusion"]])
def test_model_classes_other_than_the_datas_are_refused_before_the_run_folder(tmp_path, classes):
    """Fewer classes failed in stage 2 (index out of bounds, after stage 1); the same ones in
    another order trained and put wrong class names into the bundle. Both: a ConfigError on
    model.classes naming both lists, before anything is written."""
    import yaml

    from export.arcd.train import train
    from inspector.errors import ConfigError

    real = neu_folder(tmp_path / "neu", n=12)
    path, cfg = tiny_neu_config(tmp_path, real)
    cfg["model"]["classes"] = classes
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="model.classes") as e:
        train(path, tmp_path / "run")
    assert str(classes) in str(e.value) and str(CLASSES) in str(e.value)
    assert str(path) in str(e.value) and not (tmp_path / "run").exists()


def test_stage1_windows_labelled_reads_only_the_labelled_masks_and_the_run_records_it(tmp_path,
                                                                                    monkeypatch):
    """data.stage1_windows: 'all' (the default, every shipped result) places stage 1's windows
    with the masks of every training image; 'labelled' only with those of the labelled subset.
    metrics.json records the mode and how many images' masks stage 1 draws from."""
    from export.arcd.data import FolderDataConfig
    from export.arcd.train import train
    from inspector.evaluation.datasets import Dataset, split_of

    real = neu_folder(tmp_path / "neu", n=40)
    n_train = len(labelled_subset(real, 1.0, seed=0))
    keep = {e.stem for e in labelled_subset(real, 0.3, seed=0).entries}
    everything = data_for(real, label_fraction=0.3)
    assert everything.stage1_info["windows"] == "all"
    assert everything.stage1_info["mask_images"] == n_train > len(keep)
    strict = data_for(real, label_fraction=0.3, stage1_windows="labelled")
    assert strict.stage1_info["mask_images"] == len(keep)

    read: list[str] = []
    orig = Dataset.load

    def spy(self, i):
        read.append(self.entries[i].stem)
        return orig(self, i)

    monkeypatch.setattr(Dataset, "load", spy)
    strict.check()
    for i in range(40):
        strict.stage1.sample(i)
    training_reads = {s for s in read if split_of(s) != "val"}
    assert training_reads and training_reads <= keep  # no mask outside the labelled subset
    monkeypatch.setattr(Dataset, "load", orig)
    with pytest.raises(ValueError, match="stage1_windows"):
        FolderDataConfig(source="magnetic-tile", root="x", normal_source="mt-free",
                         stage1_windows="labelled")

    path, _ = tiny_neu_config(tmp_path, real, label_fraction=0.3, stage1_windows="labelled")
    m = json.loads((train(path, tmp_path / "run") / "metrics.json").read_text())
    s1 = m["stage1"]["data"]
    assert s1["windows"] == "labelled" and s1["mask_images"] == len(keep)
    assert s1["labelled_images"] == len(keep) and s1["train_images"] == n_train

    # the README's recipe (another run from this stage-1 checkpoint) under a config of the other
    # mode: the record is of the data that trained R, not of the new config
    import shutil

    (tmp_path / "run2").mkdir()
    shutil.copy(tmp_path / "run" / "checkpoint-stage1.pt", tmp_path / "run2" / "checkpoint.pt")
    path, _ = tiny_neu_config(tmp_path, real, label_fraction=0.3)
    m = json.loads((train(path, tmp_path / "run2", resume=True) / "metrics.json").read_text())
    assert m["stage1"]["data"] == s1


@pytest.mark.parametrize("bad", ["corrupt-val-image", "mask-size", "missing-root", "empty-val",
                                 "no-window"])
def test_bad_training_data_is_one_line_exit_2_and_leaves_no_run_folder(tmp_path, capsys, bad):
    """Each used to be a ValueError traceback (exit 1), some only after training (a corrupt
    validation image is read at the end), with a half-made run folder behind."""
    import cv2

    from export.arcd.train import main as train_main
    from inspector.cli import main as cli_main

    real = neu_folder(tmp_path / "neu", n=12)
    data, key, named = {}, "data.root", None
    if bad == "corrupt-val-image":
        named = real / "images" / "training" / f"{_val_stem(12)}.jpg"
        named.write_bytes(b"not a jpeg")
    elif bad == "mask-size":
        named = real / "annotations" / "training" / "000001.png"
        cv2.imwrite(str(named), np.zeros((10, 12), np.uint8))
    elif bad == "missing-root":
        named = real = tmp_path / "nope"
    elif bad == "empty-val":
        data["val_split"], key = "test", "data.val_split"
        data["train_splits"] = ["train"]
        real = neu_folder(tmp_path / "neu3", n=3)  # stems 0..2: none in the hash 'test' share
    else:  # 64 px images with a defect band: no clean 64 window
        data["normal_patch"], key = 64, "data.normal_patch"
        data["train_crop"] = [64, 64]
    path, _ = tiny_neu_config(tmp_path, real, **data)
    run = tmp_path / "run"
    assert cli_main(["train", "arcd", "--config", str(path), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("inspector: error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert f"{path}: {key}: " in lines[0] and (named is None or str(named) in lines[0]), lines[0]
    assert not run.exists()
    assert train_main(["--config", str(path), "--run-dir", str(run)]) == 2 and not run.exists()
    if bad == "no-window":  # the U-Net baseline has no stage 1: it draws no window, needs none
        import yaml

        from export.arcd.train import load_config, open_training_data

        _, cfg = tiny_neu_config(tmp_path, real, **data)
        cfg["model"]["reconstruction"] = False
        path.write_text(yaml.safe_dump(cfg))
        assert open_training_data(load_config(path), path).stage1_info["mask_images_with_window"] == 0


def test_a_data_file_that_goes_bad_during_training_is_a_one_line_error(tmp_path):
    """After the up-front check, a file read during training that fails (removed, rewritten) is a
    TrainingDataError: an InspectorError (``inspector train``: one line, exit 2) naming it."""
    from export.arcd.data import DatasetFrames, TrainingDataError
    from inspector.errors import InspectorError
    from inspector.evaluation.datasets import open_dataset

    real = neu_folder(tmp_path / "neu", n=3)
    frames = DatasetFrames(open_dataset("neu-seg", real, strict=True))
    frames.frame(0)
    (real / "images" / "training" / "000000.jpg").write_bytes(b"")
    with pytest.raises(TrainingDataError, match="000000.jpg: cannot read") as e:
        frames.frame(0)
    assert isinstance(e.value, InspectorError) and e.value.key == "data.root"

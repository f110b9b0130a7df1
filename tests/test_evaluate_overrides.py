"""Post-processing overrides that would change nothing are refused; evaluate records what decided
its figures, scores every image of a split or names the one it cannot, and leaves no partial
per-image file behind (fresh-user walkthrough E: E1, E2, E7, E8, E11)."""

from __future__ import annotations

import shutil

import pytest
import yaml

from conftest import run_cli, write_config
from inspector.errors import BundleError
from inspector.evaluation.datasets import open_dataset
from inspector.evaluation.evaluate import Runner, evaluate_bundle
from test_arcd_neu import neu_folder

ALL = {"inclusion": 0.4, "patches": 0.6, "scratches": 0.5}


def with_class_thresholds(src, dest, thresholds):
    shutil.copytree(src, dest)
    meta = dest / "bundle.yaml"
    raw = yaml.safe_load(meta.read_text())
    raw["postprocess"]["class_thresholds"] = thresholds
    meta.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def test_a_threshold_every_class_threshold_shadows_is_refused_in_a_camera_config(tmp_path, toy_bundle,
                                                                                synthetic_cfg):
    bundle = with_class_thresholds(toy_bundle, tmp_path / "b", ALL)
    cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(model={"bundle": str(bundle),
                                                                   "postprocess": {"threshold": 0.9}}))
    done = run_cli("check", "--config", str(cfg))
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()[-1]
    assert f"{cfg}: model.postprocess.threshold: never read: class_thresholds sets every class's " \
           "threshold ({inclusion: 0.4, patches: 0.6, scratches: 0.5})" in err
    assert "Set class_thresholds instead, e.g. {inclusion: 0.9, patches: 0.9, scratches: 0.9}" in err
    # read where a class is left out, or where the camera's own class_thresholds leave one out
    partial = with_class_thresholds(toy_bundle, tmp_path / "p", {"inclusion": 0.4})
    for b, pp in ((partial, {"threshold": 0.9}),
                  (bundle, {"threshold": 0.9, "class_thresholds": {"scratches": 0.7}}),
                  (bundle, {"class_thresholds": {"inclusion": 0.9, "patches": 0.9, "scratches": 0.9}})):
        write_config(cfg, synthetic_cfg(model={"bundle": str(b), "postprocess": pp}))
        done = run_cli("check", "--config", str(cfg))
        assert done.returncode == 0, (pp, done.stderr)


def test_evaluate_refuses_the_same_override_and_records_the_class_thresholds(tmp_path, toy_bundle):
    bundle = with_class_thresholds(toy_bundle, tmp_path / "b", ALL)
    with pytest.raises(BundleError, match=r"threshold \(override\): never read: class_thresholds sets every"):
        Runner(bundle, {"threshold": 0.9})
    root = neu_folder(tmp_path / "neu", n=6, size=128)
    ds = open_dataset("neu-seg", root)
    a = evaluate_bundle(bundle, ds)
    b = evaluate_bundle(bundle, ds, postprocess={"class_thresholds": {"inclusion": 0.99, "patches": 0.99,
                                                                       "scratches": 0.99}})
    # two runs with other thresholds no longer look alike: the block holds what decided them
    assert a["postprocess"]["class_thresholds"] == ALL
    assert b["postprocess"]["class_thresholds"] == {"inclusion": 0.99, "patches": 0.99, "scratches": 0.99}
    # and only what the probability recipe reads
    assert set(a["postprocess"]) == {"type", "threshold", "class_thresholds", "open_kernel", "close_kernel",
                                     "min_area_px"}


def test_an_image_without_its_mask_is_named_not_skipped(tmp_path, toy_bundle):
    root = neu_folder(tmp_path / "neu", n=6, size=128)
    neu_folder(root, n=4, size=128, subset="test", first=100)
    (root / "annotations" / "test" / "000102.png").unlink()
    done = run_cli("evaluate", "--bundle", str(toy_bundle), "--data", str(root), "--format", "neu-seg",
                   "--split", "test", "--json")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"inspector: error: {root / 'images' / 'test' / '000102.jpg'}: no annotation "
        f"{root / 'annotations' / 'test' / '000102.png'}")
    # a reader asked to skip says which
    ds = open_dataset("neu-seg", root, split="test", strict=False)
    assert len(ds) == 3 and ds.notes == ["1 image(s) without annotation skipped: 000102.jpg"]


def test_a_stopped_evaluation_leaves_no_per_image_file(tmp_path, toy_bundle, monkeypatch):
    root = neu_folder(tmp_path / "neu", n=6, size=128)
    ds = open_dataset("neu-seg", root)
    out = tmp_path / "out"
    seen = []
    real_run = Runner.run

    def run_then_stop(self, image, keep_maps=False):
        seen.append(1)
        if len(seen) == 4:
            raise KeyboardInterrupt
        return real_run(self, image, keep_maps)
    monkeypatch.setattr(Runner, "run", run_then_stop)
    with pytest.raises(KeyboardInterrupt):
        evaluate_bundle(toy_bundle, ds, out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == []  # neither per_image.jsonl nor its partial
    # stopped after the image loop, in the overlay pass (which runs the model again)
    seen.clear()

    def run_then_stop_in_the_overlays(self, image, keep_maps=False):
        seen.append(1)
        if len(seen) == 7:  # 6 images scored, then the first overlay re-run
            raise KeyboardInterrupt
        return real_run(self, image, keep_maps)
    monkeypatch.setattr(Runner, "run", run_then_stop_in_the_overlays)
    with pytest.raises(KeyboardInterrupt):
        evaluate_bundle(toy_bundle, ds, out_dir=out, overlays=2)
    assert len(seen) == 7
    assert sorted(p.name for p in out.iterdir()) == ["overlays"]
    shutil.rmtree(out / "overlays")
    monkeypatch.setattr(Runner, "run", real_run)
    evaluate_bundle(toy_bundle, ds, out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "per_image.jsonl"]
    assert len((out / "per_image.jsonl").read_text().splitlines()) == 6


def test_a_min_area_override_says_what_it_moves(tmp_path, toy_bundle, caplog):
    root = neu_folder(tmp_path / "neu", n=4, size=128)
    ds = open_dataset("neu-seg", root)
    small = evaluate_bundle(toy_bundle, ds, postprocess={"min_area_px": 1})
    big = evaluate_bundle(toy_bundle, ds, postprocess={"min_area_px": 10 ** 6})
    assert small["miou"] == big["miou"]  # the pixel figures are of the mask, as published
    assert "min_area_px (override) thins the defect lists" in caplog.text


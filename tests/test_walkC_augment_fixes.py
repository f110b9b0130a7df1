"""Walkthrough C (Defect-GAN, AnomalyAlign, ``augment measure``, ``data.synthetic_root``): what a
fresh user found, each test failing on the code before its fix.

* B1: ``anomalyalign sample`` read the checkpoint's relative ``data.root`` from the working
  directory only; the error named neither the checkpoint nor the key, and no option could
  point it at the data.
* B3: ``defectgan sample --min-defect-px`` beyond the window's area ran through every image and
  blamed ``--threshold``.
* B4: Defect-GAN ``--resume`` compared the subset's names only.
* C1: sampling an unfinished run was silent; ARCD took its pairs without a word.
* C2/C3: ``measure --pairs`` ignored the manifest; ``--out`` errors came after the measurement.
* C6: a ``data.root`` respelt (relative -> absolute, same folder) was warned of as a change.
* C7/C8/C9: ``--max-iters`` help; AnomalyAlign max_minutes did not bound its segmenter stage;
  a run of the other generator given to ``sample``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch", reason="the generators need the train extra (torch)")
pytest.importorskip("diffusers", reason="AnomalyAlign needs the augment extra (diffusers)")

from test_anomalyalign import TINY  # noqa: E402
from test_defectgan import make_neu, tiny_config  # noqa: E402

from export.augment.dataset import PairWriter  # noqa: E402
from export.training import warn_config_changes  # noqa: E402
from inspector.cli import main as inspector_main  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The trainers set torch's thread count from their config; keep this process's."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dg_train(*args, **kw) -> Path:
    from export.augment.defectgan.train import train

    return train(*args, **kw)


def aa_train(*args, **kw) -> Path:
    from export.augment.anomalyalign.train import train

    return train(*args, **kw)


def aa_config(path: Path, root: str, **over) -> Path:
    """TINY on a make_neu folder (every image labelled)."""
    cfg = json.loads(json.dumps(TINY))
    cfg["data"] = {**cfg["data"], "root": root, "label_fraction": 1.0}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def dg_run(tmp_path_factory) -> Path:
    """A Defect-GAN run stopped at 20 of its 400 planned iterations (config data.root ``neu``,
    relative to the config's folder)."""
    base = tmp_path_factory.mktemp("dgC")
    make_neu(base / "neu")
    return dg_train(tiny_config(base), base / "run", max_iters=20)


@pytest.fixture(scope="module")
def aa_run(tmp_path_factory) -> Path:
    """An AnomalyAlign run trained from its base folder with the relative data.root ``neu``,
    stopped at 2 of its 6 diffusion iterations."""
    base = tmp_path_factory.mktemp("aaC")
    make_neu(base / "neu")
    cfg = aa_config(base / "aa.yaml", "neu")
    with contextlib.chdir(base):
        return aa_train(cfg, base / "run", max_iters=2)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------
# B1: AnomalyAlign sample from another folder
# ---------------------------------------------------------------------------------------------

def test_anomalyalign_sample_works_from_another_folder(aa_run, tmp_path, monkeypatch):
    from export.augment.anomalyalign.sample import sample

    monkeypatch.chdir(tmp_path)  # "neu" is not here: the run's recorded folder is used
    sample(aa_run, tmp_path / "out", 2, seed=0)
    assert manifest(tmp_path / "out")["pairs"] == 2


def test_anomalyalign_old_checkpoint_names_file_and_key_and_takes_data_root(aa_run, tmp_path,
                                                                             monkeypatch, capsys):
    run = tmp_path / "old-run"
    shutil.copytree(aa_run, run)
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    ck.pop("base_dir", None)  # as written before the working directory was recorded
    torch.save(ck, run / "checkpoint.pt")
    monkeypatch.chdir(tmp_path)
    argv = ["augment", "anomalyalign", "sample", "--run-dir", str(run), "--n", "2"]
    assert inspector_main([*argv, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{run / 'checkpoint.pt'}: data.root: neu" in err and "--data-root" in err
    assert not (tmp_path / "a").exists()
    # --data-root points it at the data; a wrong one names the option
    assert inspector_main([*argv, "--out", str(tmp_path / "b"), "--data-root",
                           str(aa_run.parent / "neu")]) == 0
    assert manifest(tmp_path / "b")["pairs"] == 2
    capsys.readouterr()
    assert inspector_main([*argv, "--out", str(tmp_path / "c"), "--data-root",
                           str(tmp_path / "nope")]) == 2
    assert f"--data-root {tmp_path / 'nope'}: NEU-Seg root not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# B3: --min-defect-px beyond the window
# ---------------------------------------------------------------------------------------------

def test_min_defect_px_beyond_the_window_is_refused_up_front(dg_run, tmp_path, monkeypatch):
    from export.augment.defectgan import sample as sample_mod

    calls = []
    real = sample_mod.DefectPainter.paint
    monkeypatch.setattr(sample_mod.DefectPainter, "paint",
                        lambda self, *a: calls.append(1) or real(self, *a))
    with pytest.raises(ValueError, match=r"^--min-defect-px 100000: at most 1024 \(.*32x32-px window"):
        sample_mod.sample(dg_run, tmp_path / "o", 3, 0, min_defect_px=100000)
    assert not calls and not (tmp_path / "o").exists()


def test_running_out_of_pairs_names_threshold_and_min_defect_px(dg_run, tmp_path, monkeypatch):
    from export.augment.defectgan import sample as sample_mod

    # a generator that never draws anything over the threshold
    monkeypatch.setattr(sample_mod.DefectPainter, "paint",
                        lambda self, w, cls, gen: (w.copy(), np.zeros(w.shape, np.float32)))
    with pytest.raises(ValueError, match=r"--threshold 0.5 / --min-defect-px 20: only 0 of 2"):
        sample_mod.sample(dg_run, tmp_path / "o", 2, 0)


# ---------------------------------------------------------------------------------------------
# B4: Defect-GAN resume compares the subset's content
# ---------------------------------------------------------------------------------------------

def test_defectgan_resume_refuses_a_subset_image_with_other_pixels(tmp_path):
    from inspector.errors import ConfigError

    make_neu(tmp_path / "neu")
    cfg = tiny_config(tmp_path)
    run = dg_train(cfg, tmp_path / "run", max_iters=2)
    old = tmp_path / "old"  # a checkpoint of the trainer before the digests: names only
    shutil.copytree(run, old)
    ck = torch.load(old / "checkpoint.pt", weights_only=True)
    ck.pop("subset_digests", None)
    torch.save(ck, old / "checkpoint.pt")
    # the same file names, one image's content swapped for another's
    img = tmp_path / "neu" / "images" / "training"
    shutil.copy(img / "img001.jpg", img / "img000.jpg")
    with pytest.raises(ConfigError, match=r"data.root: .*same name but other pixels or masks "
                                          r"\(first: \S*img000\)"):
        dg_train(cfg, run, resume=True, max_iters=1)
    assert dg_train(cfg, old, resume=True, max_iters=1) == old


# ---------------------------------------------------------------------------------------------
# C1: unfinished runs
# ---------------------------------------------------------------------------------------------

def test_sampling_an_unfinished_defectgan_run_warns_and_records_it(dg_run, tmp_path, caplog):
    from export.augment.defectgan.sample import sample

    with caplog.at_level(logging.WARNING):
        sample(dg_run, tmp_path / "o", 2, 0, threshold=0.05, min_defect_px=1)
    text = caplog.text
    assert f"{dg_run}: training stopped at critic iteration 20 of 400" in text
    assert "--resume" in text
    man = manifest(tmp_path / "o")
    assert man["training_complete"] is False and man["planned_iterations"] == 400


def test_sampling_a_finished_defectgan_run_is_silent_and_complete(tmp_path, caplog):
    from export.augment.defectgan.sample import sample

    make_neu(tmp_path / "neu")
    run = dg_train(tiny_config(tmp_path, optim={"iterations": 3}), tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        sample(run, tmp_path / "o", 1, 0, min_defect_px=1)
    assert "unfinished" not in caplog.text
    assert manifest(tmp_path / "o")["training_complete"] is True


def test_sampling_an_unfinished_anomalyalign_run_warns_and_records_it(aa_run, tmp_path, caplog,
                                                                       monkeypatch):
    from export.augment.anomalyalign.sample import sample

    monkeypatch.chdir(aa_run.parent)
    with caplog.at_level(logging.INFO):
        sample(aa_run, tmp_path / "o", 1, 0)
    assert f"{aa_run}: training stopped at diffusion iteration 2 of 6" in caplog.text
    assert "(iteration 2 of 6)" in caplog.text
    man = manifest(tmp_path / "o")
    assert man["training_complete"] is False and man["planned_iterations"] == 6


def test_arcd_warns_once_of_pairs_from_an_unfinished_generator(tmp_path, caplog):
    from test_arcd_synthetic import data_for, neu_folder

    real = neu_folder(tmp_path / "neu", n=20)

    def pairs(root: Path, **extra) -> Path:
        w = PairWriter(root, "defectgan")
        for _ in range(3):
            mask = np.zeros((64, 64), np.uint8)
            mask[20:40, 20:40] = 2
            w.add(np.full((64, 64), 240, np.uint8), mask, source="test")
        w.close(checkpoint="runs/x/checkpoint.pt", checkpoint_step=60, **extra)
        return root

    with caplog.at_level(logging.WARNING, logger="export.arcd.data"):
        data_for(real, synthetic_root=str(pairs(tmp_path / "unf", planned_iterations=6000,
                                                     training_complete=False)))
    hits = [r for r in caplog.records if "had not finished training" in r.getMessage()]
    assert len(hits) == 1 and "60 of 6000" in hits[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="export.arcd.data"):
        data_for(real, synthetic_root=str(pairs(tmp_path / "old")))  # an older manifest: no key
        data_for(real, synthetic_root=str(pairs(tmp_path / "done", training_complete=True)))
    assert "had not finished" not in caplog.text


# ---------------------------------------------------------------------------------------------
# C2/C3: measure
# ---------------------------------------------------------------------------------------------

def pair_folder(root: Path, n: int = 3) -> Path:
    w = PairWriter(root, "testgen")
    rng = np.random.default_rng(0)
    for _ in range(n):
        w.add(rng.integers(0, 255, (32, 32)).astype(np.uint8), np.zeros((32, 32), np.uint8))
    w.close()
    return root


def measure(*argv: str) -> list[str]:
    return ["augment", "measure", *argv]


def test_measure_reads_the_manifests_pairs_and_refuses_a_folder_without_one(tmp_path, capsys):
    pairs = pair_folder(tmp_path / "p")
    # an image the manifest does not list (left over) is not measured
    cv2.imwrite(str(pairs / "images" / "training" / "stray.jpg"), np.zeros((32, 32), np.uint8))
    cv2.imwrite(str(pairs / "annotations" / "training" / "stray.png"), np.zeros((32, 32), np.uint8))
    assert inspector_main(measure("--pairs", str(pairs))) == 0
    assert json.loads(capsys.readouterr().out)["generated"]["images"] == 3
    bare = tmp_path / "bare"
    shutil.copytree(pairs, bare)
    (bare / "manifest.json").unlink()
    assert inspector_main(measure("--pairs", str(bare))) == 2
    err = capsys.readouterr().err
    assert "--pairs" in err and "no manifest.json" in err and "--reference" in err
    (bare / "manifest.json").write_text('{"format": ')
    assert inspector_main(measure("--pairs", str(bare))) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_measure_out_is_checked_before_measuring(tmp_path, capsys):
    pairs = pair_folder(tmp_path / "p")
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "adir").mkdir()
    for out, why in ((tmp_path / "adir", "is a folder"), (afile / "x.json", "is a file")):
        assert inspector_main(measure("--pairs", str(pairs), "--out", str(out))) == 2
        cap = capsys.readouterr()
        assert cap.err.startswith(f"inspector: error: --out {out}: ") and why in cap.err
        assert cap.out == ""  # refused before the measurement printed anything
    assert inspector_main(measure("--pairs", str(pairs), "--out", str(tmp_path / "n" / "m.json"))) == 0
    assert json.loads((tmp_path / "n" / "m.json").read_text())["generated"]["images"] == 3


# ---------------------------------------------------------------------------------------------
# C6: a data.root respelt is no change
# ---------------------------------------------------------------------------------------------

def test_warn_config_changes_compares_resolved_data_roots(tmp_path, caplog):
    (tmp_path / "data" / "x").mkdir(parents=True)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    saved = {"seed": 0, "data": {"root": "../data/x"}, "base_dir": str(tmp_path / "cfg")}
    cases = [({"root": str(tmp_path / "data" / "x")}, False),  # absolute, same folder
             ({"root": str(tmp_path / "link" / "x")}, False),  # through a symlink
             ({"root": str(tmp_path / "data")}, True)]  # another folder
    for data, warned in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            warn_config_changes(saved, {"seed": 0, "data": data, "base_dir": "/elsewhere"}, "c.yaml",
                                Path("ck.pt"), "iteration 1")
        assert ("data.root" in caplog.text) is warned, data
        assert "base_dir" not in caplog.text
    # a list of sources (clgan, fuzzymask) and working-directory roots (AnomalyAlign)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_config_changes({"data": {"sources": [{"root": "data/x", "w": 1}]}},
                            {"data": {"sources": [{"root": str(tmp_path / "data" / "x"), "w": 1}]}},
                            "c.yaml", Path("ck.pt"), "step 1", base_dirs=(tmp_path, "/other"))
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING):
        warn_config_changes({"data": {"sources": [{"root": "data/x", "w": 1}]}},
                            {"data": {"sources": [{"root": str(tmp_path / "data" / "x"), "w": 2}]}},
                            "c.yaml", Path("ck.pt"), "step 1", base_dirs=(tmp_path, "/other"))
    assert "data.sources" in caplog.text


def test_defectgan_resume_with_the_same_root_spelt_absolute_warns_nothing(dg_run, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(dg_run, run)
    base = dg_run.parent
    cfg = tiny_config(tmp_path, data={"root": str(base / "neu")})
    with caplog.at_level(logging.WARNING):
        dg_train(cfg, run, resume=True, max_iters=1)
    assert "differs from the config" not in caplog.text


def test_anomalyalign_resume_from_elsewhere_with_the_same_root_warns_nothing(aa_run, tmp_path,
                                                                             caplog, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(aa_run, run)
    cfg = aa_config(tmp_path / "aa.yaml", str(aa_run.parent / "neu"))
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        aa_train(cfg, run, resume=True, max_iters=1)
    assert "differs from the config" not in caplog.text


# ---------------------------------------------------------------------------------------------
# C7/C8/C9
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["defectgan", "anomalyalign"])
def test_max_iters_help_says_it_counts_this_invocation(kind, capsys):
    with pytest.raises(SystemExit):
        inspector_main(["augment", kind, "train", "--help"])
    assert "in this invocation" in " ".join(capsys.readouterr().out.split())


def test_anomalyalign_max_minutes_stops_the_segmenter_stage_cleanly(tmp_path, caplog):
    make_neu(tmp_path / "neu")
    cfg = aa_config(tmp_path / "aa.yaml", str(tmp_path / "neu"), max_minutes=1e-6,
                    segmenter={"steps": 50})
    with caplog.at_level(logging.INFO):
        run = aa_train(cfg, tmp_path / "run")
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["stage"] == "segmenter" and ck["segmenter_training"]["step"] < 50
    assert "reached at segmenter step" in caplog.text
    assert not (run / "prompts.json").exists()  # the prompt stage did not run
    # --resume without the limit goes on to the diffusion stage
    aa_config(tmp_path / "aa.yaml", str(tmp_path / "neu"), segmenter={"steps": 50})
    aa_train(cfg, run, resume=True, max_iters=1)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["stage"] == "diffusion"


def test_a_run_of_the_other_generator_names_its_kind_and_command(dg_run, aa_run, tmp_path, capsys):
    def err(kind: str, run: Path) -> str:
        assert inspector_main(["augment", kind, "sample", "--run-dir", str(run), "--out",
                               str(tmp_path / kind), "--n", "1"]) == 2
        return capsys.readouterr().err

    assert ("a Defect-GAN run (kind defectgan), not AnomalyAlign: sample it with "
            "`inspector augment defectgan sample`") in err("anomalyalign", dg_run)
    msg = err("defectgan", aa_run)
    assert "(kind anomalyalign), not Defect-GAN: sample it with `inspector augment anomalyalign sample`" in msg
    for kind in ("defectgan", "anomalyalign"):  # one message for a missing --run-dir
        assert f"inspector: error: --run-dir {tmp_path / 'nope'}: run folder not found" in err(
            kind, tmp_path / "nope")

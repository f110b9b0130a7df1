"""Settings that cannot apply to the model or source they are given for are refused at load,
with one line naming the file and the key (a new user's walkthrough found each accepted)."""

from __future__ import annotations

import cv2
import numpy as np

from conftest import ROOT, run_cli, write_config


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("inspector: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_a_postprocess_type_the_model_cannot_feed_is_refused_at_load(tmp_path, synthetic_cfg):
    # the toy model outputs class probabilities: dual_threshold reads a residual. `check` ended in
    # a traceback and `run` dropped every frame as postprocess_error, then exited 0
    cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(model={"postprocess": {"type": "dual_threshold"}}))
    for cmd in (["check"], ["run", "--frames", "2"]):
        r = run_cli(*cmd, "--config", str(cfg), timeout=120)
        assert r.returncode == 2, (cmd, r.stderr)
        assert one_line(r.stderr).endswith(
            f"{cfg}: model.postprocess.type: dual_threshold needs a model that outputs a residual; "
            f"this one outputs class probabilities (toy, kind arcd)")


def test_evaluate_refuses_overrides_the_bundle_does_not_read(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    cv2.imwrite(str(data / "a.png"), np.full((64, 64), 120, np.uint8))
    base = ["evaluate", "--bundle", str(ROOT / "deploy/models/demo-arcd"), "--data", str(data), "--format", "folder"]
    r = run_cli(*base, "--set", "k1=3.5", timeout=120)
    assert r.returncode == 2
    assert "k1 (override): the probability post-processing of demo-arcd does not read it" in one_line(r.stderr)
    r = run_cli(*base, "--set", "type=dual_threshold", timeout=120)
    assert r.returncode == 2
    assert one_line(r.stderr).endswith("--set type: dual_threshold needs a model that outputs a residual; "
                                       "this one outputs class probabilities")


def test_backpressure_on_a_camera_is_refused(tmp_path):
    import yaml

    raw = yaml.safe_load((ROOT / "configs/viky.yaml").read_text())
    raw["model"]["bundle"] = str(ROOT / "deploy/models/demo-arcd")
    raw["pipeline"] = {"backpressure": True}
    cfg = write_config(tmp_path / "cam.yaml", raw)
    r = run_cli("check", "--config", str(cfg), timeout=120)
    assert r.returncode == 2
    assert f"{cfg}: pipeline.backpressure: true, but a camera cannot wait" in one_line(r.stderr)


def test_an_empty_replay_folder_is_bad_input_naming_the_file(tmp_path, synthetic_cfg):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    raw = synthetic_cfg()
    raw["source"] = {"type": "replay", "path": str(empty)}
    cfg = write_config(tmp_path / "cam.yaml", raw)
    r = run_cli("run", "--config", str(cfg), "--frames", "1", timeout=120)
    assert r.returncode == 2  # was 1: a systemd unit restarted it every 5 s for ever
    assert f"{cfg}: source.pattern: no images matching '*' in {empty} (source.path)" in one_line(r.stderr)


def test_check_refuses_what_the_daemon_refuses_and_warns_of_a_held_port(tmp_path, synthetic_cfg):
    # README: `inspector check` before `systemctl enable`; it said "result: ok" for configs the
    # unit then refused with exit 2 (not restarted: RestartPreventExitStatus=2)
    import json
    import socket

    bad_rule = synthetic_cfg(alarms={"rules": [{"name": "r", "classes": ["rust"]}]})
    cfg = write_config(tmp_path / "rule.yaml", bad_rule)
    r = run_cli("check", "--config", str(cfg), timeout=120)
    assert r.returncode == 2 and f"{cfg}: alarms.rules.0.classes: unknown class(es) ['rust']" in one_line(r.stderr)

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path / "port.yaml", synthetic_cfg(publish={"endpoint": f"tcp://127.0.0.1:{port}"}))
        r = run_cli("check", "--config", str(cfg), "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    warnings = [w for w in summary["warnings"] if "add --user" not in w]  # (the hint of a root check)
    assert summary["result"] == "ok" and len(warnings) == 1
    assert f"publish.endpoint tcp://127.0.0.1:{port}: cannot bind now" in warnings[0]


def test_an_output_folder_that_cannot_be_made_is_named_before_any_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("a file, not a folder")
    bad = afile / "out"
    data = tmp_path / "data"
    data.mkdir()
    cv2.imwrite(str(data / "a.png"), np.full((64, 64), 120, np.uint8))
    for cmd in (["bench", "--config", "configs/demo.yaml", "--frames", "5"],
                ["evaluate", "--bundle", "deploy/models/demo-arcd", "--data", str(data), "--format", "folder"]):
        r = run_cli(*cmd, "--out", str(bad), timeout=120)
        assert r.returncode == 2, (cmd, r.stderr)  # was 1, a bare "[Errno 20] Not a directory", after the run
        assert one_line(r.stderr) == f"inspector: error: --out {bad}: cannot create the folder (Not a directory)"


def neu_root(root, n: int = 12, test_folder: bool = False):
    for sub in ["training"] + (["test"] if test_folder else []):
        (root / "images" / sub).mkdir(parents=True)
        (root / "annotations" / sub).mkdir(parents=True)
        for i in range(n):
            img = np.full((64, 64), 100 + i, np.uint8)
            mask = np.zeros((64, 64), np.uint8)
            mask[10:20, 10:30] = 1 + i % 3
            cv2.imwrite(str(root / "images" / sub / f"{sub}_{i:03d}.jpg"), img)
            cv2.imwrite(str(root / "annotations" / sub / f"{sub}_{i:03d}.png"), mask)
    return root


def test_evaluate_flags_a_split_the_model_was_trained_on(tmp_path):
    # ARCD trains on the hash train + test shares (test is meant to be NEU-Seg's own test folder):
    # on a root without that folder `--split test` scored training images without a word
    import json
    import shutil

    import yaml

    bundle = tmp_path / "bundle"
    shutil.copytree(ROOT / "deploy/models/demo-arcd", bundle)
    meta = yaml.safe_load((bundle / "bundle.yaml").read_text())
    meta["provenance"]["training_config"]["data"] = {"source": "neu-seg", "root": "../data/neu_seg",
                                                     "train_splits": ["train", "test"], "val_split": "val"}
    (bundle / "bundle.yaml").write_text(yaml.safe_dump(meta))

    def notes(root, split):
        r = run_cli("evaluate", "--bundle", str(bundle), "--data", str(root), "--format", "neu-seg",
                    "--split", split, "--json", timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["data"]["notes"], r.stderr

    hashed = neu_root(tmp_path / "hashed")
    got, err = notes(hashed, "test")
    assert len(got) == 1 and "split 'test' is one of the hash shares ['train', 'test'] this model was trained on" in got[0]
    assert "not held-out ones" in err  # and a warning on the terminal
    assert notes(hashed, "val")[0] == []
    assert notes(neu_root(tmp_path / "official", test_folder=True), "test")[0] == []  # its own test/ folder


def test_check_names_a_held_port_only_when_it_is_held(tmp_path, synthetic_cfg):
    # an address this machine does not have is not "another process"
    import json

    cfg = write_config(tmp_path / "addr.yaml", synthetic_cfg(publish={"endpoint": "tcp://192.0.2.10:5555"}))
    r = run_cli("check", "--config", str(cfg), "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    (warning,) = [w for w in json.loads(r.stdout)["warnings"] if "add --user" not in w]
    assert "cannot bind now" in warning and "another process" not in warning

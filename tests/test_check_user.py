"""``inspector check --user NAME``: the daemon's file access asked as the service user.

The kernel answers (a forked child runs as the user): these tests need root, to become another
user, and the ``nobody`` account; they skip with that reason elsewhere. Their files live in a
folder under /tmp opened to everyone, since pytest's own tmp folder is closed to other users.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import run_cli, write_config
from inspector.access_check import Access, hidden_from_unit, refused_as
from inspector.errors import InspectorError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="checking as another user needs root")


def _nobody() -> str:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user on this machine")
    return "nobody"


@pytest.fixture
def open_tree(synthetic_cfg, toy_bundle):
    """A config, a bundle copy and a recordings folder that every user may read (and write)."""
    top = Path(tempfile.mkdtemp(prefix="inspector-user-", dir="/tmp"))
    try:
        top.chmod(0o755)
        bundle = top / "bundle"
        shutil.copytree(toy_bundle, bundle)
        for p in [bundle, *bundle.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        rec = top / "rec"
        rec.mkdir()
        rec.chmod(0o1777)
        cfg = write_config(top / "cam.yaml", synthetic_cfg(
            model={"bundle": str(bundle)}, record={"enabled": True, "dir": str(rec)}))
        cfg.chmod(0o644)
        yield top, cfg
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _runtime_refused(user: str, python: str) -> bool:
    """Whether ``user`` may not run this interpreter, by the system's own tool (an oracle apart
    from the code under test): a runtime under /root is closed to other users."""
    return subprocess.run(["setpriv", f"--reuid={pwd.getpwnam(user).pw_uid}",
                           f"--regid={pwd.getpwnam(user).pw_gid}", "--clear-groups",
                           "test", "-x", python]).returncode != 0


def test_the_kernel_answers_as_the_user_for_each_kind_of_access(open_tree):
    user = _nobody()
    top, cfg = open_tree
    closed = top / "closed"
    closed.mkdir(mode=0o700)
    (closed / "model.onnx").write_bytes(b"x")
    private = top / "private.yaml"
    private.write_text("a: 1")
    private.chmod(0o600)
    ro = top / "ro"
    ro.mkdir(mode=0o755)  # root's: others may list it, not write it
    wanted = [Access(cfg, "read", None, "the config file"),
              Access(top / "bundle" / "model.onnx", "read", "model.bundle", "a model bundle file"),
              Access(closed / "model.onnx", "read", "model.bundle", "a model bundle file"),
              Access(private, "read", None, "the config file"),
              Access(top / "rec", "write", "record.dir", "the recordings folder"),
              Access(ro, "write", "record.dir", "the recordings folder"),
              Access(ro, "list", "source.path", "the replay source")]
    refused = refused_as(user, wanted)
    assert [(a.path, a.closed) for a in refused] == [
        (closed / "model.onnx", str(closed)), (private, None), (ro, None)]
    # the key, the closed folder and who owns it: what to chown / chmod
    assert f"(model.bundle; the folder {closed} is closed to it; owned by root:root, mode 0700)" in \
        refused[0].refusal(), refused[0].refusal()
    assert refused[2].refusal() == f"write the recordings folder {ro} (record.dir; owned by root:root, mode 0755)"
    assert refused_as("root", wanted) == []  # the same questions as root (no switch): all open


def test_check_as_the_service_user_names_every_closed_path_and_exits_2(open_tree):
    user = _nobody()
    top, cfg = open_tree
    (top / "bundle" / "model.onnx").chmod(0o600)
    (top / "rec").chmod(0o755)  # root's, not writable to others
    done = run_cli("check", "--config", str(cfg), "--user", user)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()[-1]
    assert f"{cfg}: " in err and f"the service user '{user}' cannot" in err
    assert f"read a model bundle file {top / 'bundle' / 'model.onnx'}" in err
    assert f"write the folder the recordings go into {top / 'rec'}" in err  # the camera's is made at start
    if _runtime_refused(user, os.path.realpath(sys.executable)):
        assert "run the runtime's Python" in err and "is closed to it" in err
        assert f"{cfg}: the service user" in err  # the first refusal (the runtime) has no key
    else:
        assert f"{cfg}: model.bundle: the service user" in err
    assert "the unit would fail at start" in err


def test_check_as_a_user_who_may_open_everything_passes_and_says_so(open_tree):
    top, cfg = open_tree
    done = run_cli("check", "--config", str(cfg), "--user", "root", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["user"].startswith("root can read the config, the runtime and the bundle (")
    assert f"and write {top / 'rec'}" in out["user"]
    assert "checked as root" not in out["record"]  # the access was proved, not guessed
    # the test tree is under /tmp, which the shipped unit hides (PrivateTmp=yes)
    assert any(w.startswith("model.bundle: the model bundle folder") and "PrivateTmp=yes" in w
               for w in out["warnings"])
    plain = run_cli("check", "--config", str(cfg), "--json")  # as root, without --user
    assert plain.returncode == 0, plain.stderr
    out = json.loads(plain.stdout)
    assert "user" not in out and "checked as root" in out["record"]
    assert any("add --user" in w for w in out["warnings"])


def test_an_unknown_user_and_a_non_root_caller_are_refused(open_tree, monkeypatch):
    top, cfg = open_tree
    done = run_cli("check", "--config", str(cfg), "--user", "no-such-user-here")
    assert done.returncode == 2
    assert "--user no-such-user-here: no such user on this machine" in done.stderr
    user = _nobody()
    monkeypatch.setattr(os, "geteuid", lambda: 4321)  # a caller who is neither root nor nobody
    with pytest.raises(InspectorError, match="checking as another user needs root"):
        refused_as(user, [Access(cfg, "read", None, "the config file")])


def test_paths_the_unit_hides_are_warned_once_per_key():
    wanted = [Access(Path("/etc/inspector/cameras/a.yaml"), "read", None, "the config file"),
              Access(Path("/home/op/bundle"), "list", "model.bundle", "the model bundle folder"),
              Access(Path("/home/op/bundle/model.onnx"), "read", "model.bundle", "a model bundle file"),
              Access(Path("/var/tmp/rec"), "write", "record.dir", "the recordings folder"),
              Access(Path("/opt/inspector/models/x/model.onnx"), "read", "model.bundle", "a file")]
    warned = hidden_from_unit(wanted)
    assert len(warned) == 2
    assert warned[0].startswith("model.bundle: the model bundle folder /home/op/bundle is under /home")
    assert "ProtectHome=yes" in warned[0]
    assert warned[1].startswith("record.dir:") and "PrivateTmp=yes" in warned[1]


def test_recording_folders_a_root_shell_made_are_caught(open_tree):
    """``inspector run`` by hand as root may leave the camera's folders root's: the unit's writer
    then fails on its first record, long after the start; the check names the folder."""
    user = _nobody()
    top, cfg = open_tree
    images = top / "rec" / "test" / "defects" / "images"
    images.mkdir(parents=True)
    for d in (top / "rec" / "test", images.parent):
        d.chmod(0o1777)
    images.chmod(0o755)
    done = run_cli("check", "--config", str(cfg), "--user", user)
    assert done.returncode == 2
    assert f"cannot write the recordings folder {images} (record.dir; owned by root:root, mode 0755);" in done.stderr
    assert f"recordings folder {images.parent};" not in done.stderr


def test_bundle_files_behind_links_and_every_replay_image_are_asked(open_tree, tmp_path):
    """The engine opens a linked graph and walks into a linked folder; a replay source reads every
    image: each is a question, however many there are."""
    from inspector.access_check import needed_access
    from inspector.config import load_config

    user = _nobody()
    top, cfg = open_tree
    private = top / "private"
    private.mkdir(mode=0o700)
    (private / "weights.bin").write_bytes(b"w")
    (top / "bundle" / "weights.bin").symlink_to(private / "weights.bin")
    shared = top / "shared-calib"
    shared.mkdir(mode=0o755)
    for i in range(250):
        (shared / f"{i:03d}.png").write_bytes(b"x")
        (shared / f"{i:03d}.png").chmod(0o644)
    (shared / "249.png").chmod(0o600)
    (top / "bundle" / "calib").symlink_to(shared)
    (top / "bundle" / "calib" / "loop").symlink_to(top / "bundle")  # a loop is walked once
    wanted = needed_access(load_config(cfg), None)
    asked = {a.path for a in wanted}
    assert top / "bundle" / "weights.bin" in asked and top / "bundle" / "calib" / "249.png" in asked
    refused = refused_as(user, wanted)
    assert {a.path for a in refused if a.key == "model.bundle"} == {
        top / "bundle" / "weights.bin", top / "bundle" / "calib" / "249.png"}
    # a replay folder: every image matching the pattern
    frames = top / "frames"
    frames.mkdir(mode=0o755)
    for i in range(3):
        (frames / f"f{i}.png").write_bytes(b"x")
        (frames / f"f{i}.png").chmod(0o644 if i != 1 else 0o600)
    replay = write_config(top / "replay.yaml", {
        "camera_id": "test", "source": {"type": "replay", "path": str(frames), "pattern": "*.png"},
        "model": {"bundle": str(top / "bundle")}})
    refused = refused_as(user, needed_access(load_config(replay), None))
    assert [a.path for a in refused if a.key == "source.path"] == [frames / "f1.png"]


def test_a_latched_alarm_folder_the_user_cannot_write_is_caught(open_tree, synthetic_cfg):
    """The daemon refuses to start (exit 2) where it cannot keep latched alarms: so does the check."""
    import yaml

    user = _nobody()
    top, cfg = open_tree
    state = top / "state"
    state.mkdir(mode=0o755)  # root's: the service user cannot make alarms/ in it
    raw = yaml.safe_load(cfg.read_text())
    raw["alarms"] = {"rules": [{"name": "big", "latch": True}], "latch_file": str(state / "alarms" / "cam.json")}
    cfg.write_text(yaml.safe_dump(raw))
    done = run_cli("check", "--config", str(cfg), "--user", user)
    assert done.returncode == 2
    assert (f"cannot write the latched-alarm folder {state} (alarms.latch_file; owned by root:root, "
            "mode 0755)") in done.stderr
    state.chmod(0o1777)
    done = run_cli("check", "--config", str(cfg), "--user", user)
    assert "latched-alarm folder" not in done.stderr
    done = run_cli("check", "--config", str(cfg), "--json")
    assert done.returncode == 0, done.stderr
    assert f"latched alarms kept in {state / 'alarms' / 'cam.json'}" in json.loads(done.stdout)["alarms"]
    assert not (state / "alarms").exists()  # the check creates nothing

"""deploy/install.sh into a scratch root (DESTDIR), offline, from a locally built wheel; the unit
verifies with systemd-analyze; uninstall.sh removes it again. The system itself is never touched:
systemctl, useradd & co. are replaced on PATH by recorders that must stay silent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

SYSTEM_COMMANDS = ("systemctl", "useradd", "userdel", "usermod", "groupadd", "systemd-sysusers",
                   "systemd-tmpfiles", "chown")


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("fakebin")
    log = d / "calls.log"
    for name in SYSTEM_COMMANDS:
        f = d / name
        f.write_text(f"#!/bin/sh\necho \"{name} $*\" >> '{log}'\n")
        f.chmod(0o755)
    return d, log


def run_script(script: str, env_extra: dict, fake_bin: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(["sh", str(ROOT / "deploy" / script), *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd="/")


@pytest.fixture(scope="module")
def inspector_wheel(tmp_path_factory) -> Path:
    """The inspector's wheel, built offline from a copy of the tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build the wheel from a copy, so the shared working tree gets no build/ or egg-info.
    src = tmp / "src"
    src.mkdir()
    for f in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, src / f)
    for pkg in ("inspector", "export", "calibration"):  # what setup.cfg packages
        if (ROOT / pkg).is_dir():
            shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    [wheel] = (tmp / "dist").glob("strip_inspector-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory, fake_bin, toy_bundle, inspector_wheel) -> Path:
    """One offline scratch-root install shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("deploy")
    wheel = inspector_wheel
    models = tmp / "models"
    shutil.copytree(toy_bundle, models / "toy")
    root = tmp / "root"
    base_python = Path(sys.base_prefix) / "bin" / "python3"
    fake, log = fake_bin
    r = run_script("install.sh", {"DESTDIR": str(root), "PYTHON": str(base_python), "MODELS": str(models),
                                  "PIP_ARGS": "--no-index --no-deps"}, fake, str(wheel))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "scratch-root install" in r.stdout
    return root


def test_install_into_destdir_builds_the_tree_offline_without_touching_the_system(installed, fake_bin):
    root = installed
    _, log = fake_bin
    assert not log.exists() or log.read_text() == "", f"system commands were called:\n{log.read_text()}"
    venv = root / "opt/inspector/venv"
    script = (venv / "bin/inspector").read_text().splitlines()[0]
    assert script == "#!/opt/inspector/venv/bin/python"  # points where the tree will live
    for f in (venv / "bin").iterdir():
        if f.is_file() and not f.is_symlink():
            assert str(root) not in f.read_text(errors="ignore"), f
    # the venv holds the package (run from elsewhere, so the working tree is not on sys.path)
    r = subprocess.run([str(venv / "bin/python"), "-c",
                        "import inspector, sys; from inspector.cli import main; print(inspector.__file__); "
                        "sys.exit(main(['--version']))"], capture_output=True, text=True, timeout=60, cwd=root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith(str(venv)) and "inspector 0.1.0" in r.stdout
    unit = (root / "etc/systemd/system/inspector@.service").read_text()
    for line in ("Type=notify", "ExecStart=/opt/inspector/venv/bin/inspector daemon --config "
                 "/etc/inspector/cameras/%i.yaml", "Restart=on-failure", "WatchdogSec=30", "User=inspector",
                 "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ReadWritePaths=-/var/lib/inspector/engines -/var/lib/inspector/recordings",
                 "DeviceAllow=char-nvidia-frontend rw", "RestartPreventExitStatus=2"):
        assert line in unit.splitlines(), line
    assert (root / "opt/inspector/models/toy/bundle.yaml").is_file()
    assert (root / "opt/inspector/README.md").is_file()
    assert (root / "var/lib/inspector/engines").is_dir() and (root / "var/lib/inspector/recordings").is_dir()
    assert (root / "usr/lib/sysusers.d/inspector.conf").read_text().startswith("u inspector ")
    sample = root / "etc/inspector/cameras/example.yaml.sample"
    from inspector.config import load_config
    cfg = load_config(sample, check_paths=False)  # the shipped example is a valid config
    assert cfg.alarms.drivers and cfg.metrics.enabled


def verify_clean(exe: str, unit: Path) -> bool:
    """systemd-analyze verify found nothing to say about our unit (it warns with exit code 0)."""
    r = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in r.stderr.splitlines() if "inspector@" in line]
    if r.returncode != 0 or problems:
        print(r.stderr)
        return False
    return True


def test_installed_unit_verifies_with_systemd_analyze(installed, tmp_path):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed on this machine (no systemd): unit not verified")
    # verify checks that ExecStart exists on this machine: point it into the scratch root.
    unit = (installed / "etc/systemd/system/inspector@.service").read_text()
    units = tmp_path / "units"
    units.mkdir()
    (units / "inspector@.service").write_text(unit.replace("/opt/inspector/", f"{installed}/opt/inspector/"))
    assert verify_clean(exe, units / "inspector@cam1.service")


def test_a_broken_unit_fails_verification(tmp_path):
    # proves the verification above can fail
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed on this machine (no systemd)")
    unit = (ROOT / "deploy/inspector@.service").read_text().replace("Type=notify", "Type=notifyy")
    (tmp_path / "inspector@.service").write_text(unit.replace("/opt/inspector/venv/bin/inspector", "/bin/true"))
    assert not verify_clean(exe, tmp_path / "inspector@cam1.service")


def test_uninstall_removes_the_install_and_purge_the_rest(installed, fake_bin, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(installed, root, symlinks=True)
    fake, log = fake_bin
    (root / "etc/inspector/cameras/line1.yaml").write_text("camera_id: line1\n")
    r = run_script("uninstall.sh", {"DESTDIR": str(root)}, fake)
    assert r.returncode == 0, r.stderr
    assert not (root / "opt/inspector").exists()
    assert not (root / "etc/systemd/system/inspector@.service").exists()
    assert (root / "etc/inspector/cameras/line1.yaml").is_file()  # configs stay
    r = run_script("uninstall.sh", {"DESTDIR": str(root)}, fake, "--purge")
    assert r.returncode == 0, r.stderr
    assert not (root / "etc/inspector").exists() and not (root / "var/lib/inspector").exists()
    assert not log.exists() or log.read_text() == "", log.read_text()
    r = run_script("uninstall.sh", {"DESTDIR": str(root), "PREFIX": "/"}, fake)
    assert r.returncode == 2 and "refusing" in r.stderr


def test_install_refuses_a_source_that_is_not_the_inspector(tmp_path, fake_bin):
    fake, _ = fake_bin
    r = run_script("install.sh", {"DESTDIR": str(tmp_path / "root")}, fake, str(tmp_path))
    assert r.returncode == 1 and "neither a wheel nor the inspector source tree" in r.stderr
    assert not (tmp_path / "root").exists()


def make_wheel(folder: Path, dist: str, version: str, files: dict[str, str]) -> Path:
    """A minimal pure-Python wheel, written by hand (no build backend needed offline)."""
    import base64
    import hashlib
    import zipfile

    stem = f"{dist.replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def fake_onnxruntime(build: str, providers: list[str]) -> dict[str, str]:
    return {"onnxruntime/__init__.py": f"BUILD = {build!r}\n"
                                       f"def get_available_providers():\n    return {providers!r}\n"}


def test_a_gpu_extra_replaces_the_cpu_onnxruntime(tmp_path, fake_bin, inspector_wheel):
    """Both onnxruntime builds install the package 'onnxruntime': the GPU one must be left alone.

    Stand-ins for both builds, so this runs offline: a venv that already holds the CPU build (as
    a first install or the runtime's own requirement leaves it) is upgraded with EXTRAS=ort-gpu.
    """
    root = tmp_path / "root"
    venv = root / "opt/inspector/venv"
    base_python = Path(sys.base_prefix) / "bin" / "python3"
    subprocess.run([str(base_python), "-m", "venv", str(venv)], check=True, timeout=120)
    cpu = make_wheel(tmp_path / "cpu", "onnxruntime", "1.31.1",
                     fake_onnxruntime("cpu", ["CPUExecutionProvider"]))
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(cpu)],
                   check=True, timeout=120)
    house = tmp_path / "wheelhouse"
    make_wheel(house, "onnxruntime-gpu", "1.31.1",
               fake_onnxruntime("gpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]))
    fake, log = fake_bin
    r = run_script("install.sh", {"DESTDIR": str(root), "PYTHON": str(base_python), "MODELS": str(tmp_path / "none"),
                                  "EXTRAS": "plc,ort-gpu", "WHEELHOUSE": str(house), "PIP_ARGS": "--no-deps"},
                   fake, str(inspector_wheel))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "replacing the CPU onnxruntime with onnxruntime-gpu" in r.stdout
    assert "onnxruntime providers: CUDAExecutionProvider,CPUExecutionProvider" in r.stdout
    q = subprocess.run([str(venv / "bin/python"), "-c",
                        "import importlib.metadata as m, onnxruntime as o; print(o.BUILD); "
                        "print(sorted(d.metadata['Name'] for d in m.distributions() "
                        "if d.metadata['Name'].startswith('onnxruntime')))"],
                       capture_output=True, text=True, timeout=60, cwd=root)
    assert q.stdout.split("\n")[:2] == ["gpu", "['onnxruntime-gpu']"], q.stdout + q.stderr
    env = {"DESTDIR": str(root), "PYTHON": str(base_python), "MODELS": str(tmp_path / "none"),
           "EXTRAS": "ort-gpu", "WHEELHOUSE": str(house), "PIP_ARGS": "--no-deps"}
    # an upgrade that finds the GPU build alone keeps it: nothing downloaded again
    r = run_script("install.sh", env, fake, str(inspector_wheel))
    assert r.returncode == 0 and "onnxruntime-gpu 1.31.1 is the only onnxruntime build: kept" in r.stdout
    assert "replacing" not in r.stdout

    def cpu_build_back():  # as a dependency install pulling the CPU build in again leaves it
        subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--force-reinstall", str(cpu)], check=True, timeout=120)

    # a GPU build without the CUDA provider goes in, with a warning
    make_wheel(house, "onnxruntime-gpu", "1.31.1", fake_onnxruntime("gpu", ["CPUExecutionProvider"]))
    cpu_build_back()
    r = run_script("install.sh", env, fake, str(inspector_wheel))
    assert r.returncode == 0 and "warning: no CUDAExecutionProvider in this onnxruntime build" in r.stdout
    # the installed version cannot be had: the CPU build goes back, and the error says so
    (house / "onnxruntime_gpu-1.31.1-py3-none-any.whl").unlink()
    make_wheel(house, "onnxruntime-gpu", "1.31.2", fake_onnxruntime("gpu", ["CUDAExecutionProvider"]))
    make_wheel(house, "onnxruntime", "1.31.1", fake_onnxruntime("cpu", ["CPUExecutionProvider"]))
    cpu_build_back()
    r = run_script("install.sh", env, fake, str(inspector_wheel))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "installing onnxruntime-gpu 1.31.1 failed; the CPU onnxruntime is back in place" in r.stderr
    q = subprocess.run([str(venv / "bin/python"), "-c", "import onnxruntime as o; print(o.BUILD)"],
                       capture_output=True, text=True, timeout=60, cwd=root)
    assert q.stdout.strip() == "cpu", q.stderr

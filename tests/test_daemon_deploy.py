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
    return recorders(tmp_path_factory.mktemp("fakebin"))


def recorders(d: Path) -> tuple[Path, Path]:
    d.mkdir(exist_ok=True)
    log = d / "calls.log"
    for name in SYSTEM_COMMANDS:
        f = d / name
        f.write_text(f"#!/bin/sh\necho \"{name} $*\" >> '{log}'\n")
        f.chmod(0o755)
    return d, log


def run_script(script: str, env_extra: dict, fake_bin: Path, *args: str, path_first: Path | None = None,
               wrapper: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    path = f"{fake_bin}:{os.environ['PATH']}"
    if path_first is not None:
        path = f"{path_first}:{path}"
    env = {**os.environ, **env_extra, "PATH": path}
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run([*wrapper, "sh", str(ROOT / "deploy" / script), *args], capture_output=True, text=True,
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
    # a base Python in a folder the unit hides (this machine's may be a pyenv build under /root)
    hidden = os.path.realpath(sys.base_prefix).startswith(("/root/", "/home/", "/tmp/"))
    assert ("which the unit hides (ProtectHome=yes, PrivateTmp=yes): the service will not start"
            in r.stdout) == hidden, r.stdout
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
                 "/etc/inspector/cameras/%i.yaml", "ExecReload=/opt/inspector/venv/bin/inspector reload --pid $MAINPID",
                 "Restart=on-failure", "WatchdogSec=30", "User=inspector",
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


# a CPU rehearsal of GPU-machine tooling (12-18 s): `make test-slow`, before a device run
@pytest.mark.slow
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


# -- unit rewriting (STATEDIR, groups, runtime directory) ------------------------------------------

@pytest.fixture
def reinstall(installed, fake_bin, inspector_wheel, tmp_path):
    """install.sh run again, with more settings, over a copy of the shared scratch root (the venv is
    there already: no venv to create, nothing for pip to do)."""
    def run(env_extra: dict, *, etc_group: str | None = None, path_first: Path | None = None):
        root = tmp_path / "root"
        if not root.exists():
            shutil.copytree(installed, root, symlinks=True)
        if etc_group is not None:
            (root / "etc/group").write_text(etc_group)
        base_python = Path(sys.base_prefix) / "bin" / "python3"
        fake, _ = fake_bin
        r = run_script("install.sh", {"DESTDIR": str(root), "PYTHON": str(base_python),
                                      "MODELS": str(tmp_path / "none"), "PIP_ARGS": "--no-index --no-deps",
                                      **env_extra}, fake, str(inspector_wheel), path_first=path_first)
        assert r.returncode == 0, r.stdout + r.stderr
        return root, (root / "etc/systemd/system/inspector@.service").read_text().splitlines(), r
    return run


def verify_installed_unit(root: Path, unit: list[str], tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        return
    units = tmp_path / "units"
    units.mkdir(exist_ok=True)
    text = "\n".join(unit).replace("/opt/inspector/", f"{root}/opt/inspector/")
    (units / "inspector@.service").write_text(text + "\n")
    assert verify_clean(exe, units / "inspector@cam1.service")


def test_default_unit_keeps_its_state_directory_and_names_the_engine_cache(installed):
    unit = (installed / "etc/systemd/system/inspector@.service").read_text().splitlines()
    assert "StateDirectory=inspector" in unit and "WorkingDirectory=/var/lib/inspector" in unit
    # inspector/engines/tensorrt.py reads it for read-only bundles
    assert "Environment=INSPECTOR_ENGINE_CACHE=/var/lib/inspector/engines" in unit
    assert "Environment=INSPECTOR_RECORDINGS=/var/lib/inspector/recordings" in unit  # record.dir's default
    assert "Environment=INSPECTOR_STATE=/var/lib/inspector" in unit  # alarms.latch_file's default


def test_statedir_outside_var_lib_is_made_writable_not_a_state_directory(reinstall, fake_bin, tmp_path):
    # StateDirectory= must be relative to /var/lib: "StateDirectory=/srv/inspector" is ignored by
    # systemd, and ProtectSystem=strict then leaves /srv/inspector read-only
    root, unit, _ = reinstall({"STATEDIR": "/srv/inspector/"})
    assert not [line for line in unit if line.startswith("StateDirectory=")], unit
    assert "ReadWritePaths=/srv/inspector" in unit
    assert "WorkingDirectory=/srv/inspector" in unit
    assert "Environment=INSPECTOR_ENGINE_CACHE=/srv/inspector/engines" in unit
    assert "Environment=INSPECTOR_RECORDINGS=/srv/inspector/recordings" in unit  # record.dir's default
    assert "Environment=INSPECTOR_STATE=/srv/inspector" in unit
    assert not any("/var/lib/inspector" in line for line in unit if not line.startswith("#"))
    assert (root / "srv/inspector/engines").is_dir() and (root / "srv/inspector/recordings").is_dir()
    assert "d /srv/inspector 0750 inspector inspector -" in (root / "usr/lib/tmpfiles.d/inspector.conf").read_text()
    verify_installed_unit(root, unit, tmp_path)
    # under /var/lib, however spelt: the part relative to it
    root, unit, _ = reinstall({"STATEDIR": "/var/lib//acme/./inspector/"})
    assert "StateDirectory=acme/inspector" in unit and "ReadWritePaths=/var/lib/acme/inspector" not in unit
    assert "Environment=INSPECTOR_ENGINE_CACHE=/var/lib/acme/inspector/engines" in unit
    verify_installed_unit(root, unit, tmp_path)
    _, log = fake_bin
    assert not log.exists() or log.read_text() == "", log.read_text()


@pytest.mark.parametrize("env, message", [
    ({"STATEDIR": "/var/lib/"}, "STATEDIR=/var/lib is a system folder"),
    ({"STATEDIR": "/srv/inspector/../.."}, "STATEDIR=/ is a system folder"),
    ({"PREFIX": "/opt/"}, "PREFIX=/opt is a system folder"),
    ({"CONFDIR": "//etc"}, "CONFDIR=/etc is a system folder"),
    ({"PREFIX": "opt/inspector"}, "PREFIX=opt/inspector is not an absolute path"),
    ({"STATEDIR": "/home/ops/inspector"}, "the unit cannot write there"),
    ({"SUPPLEMENTARY_GROUPS": "video *"}, "not a list of group names"),
])
def test_install_refuses_system_folders_and_paths_the_unit_cannot_use(tmp_path, fake_bin, env, message):
    # refused before anything is written (install.sh would chown -R STATEDIR, uninstall.sh rm -rf it)
    fake, _ = fake_bin
    base_python = Path(sys.base_prefix) / "bin" / "python3"
    r = run_script("install.sh", {"DESTDIR": str(tmp_path / "root"), "PYTHON": str(base_python),
                                  "PIP_ARGS": "--no-index --no-deps", **env}, fake, str(ROOT))
    assert r.returncode == 1 and message in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "root").exists()


def test_unit_lists_only_the_supplementary_groups_that_exist(reinstall, tmp_path):
    # a group missing on the machine fails the start with 216/GROUP
    _, unit, r = reinstall({}, etc_group="root:x:0:\nvideo:x:44:\n")
    assert "SupplementaryGroups=video" in unit, unit
    assert "no group render on this machine: left out of the unit's SupplementaryGroups" in r.stdout
    _, unit, _ = reinstall({}, etc_group="video:x:44:\nrender:x:105:\n")
    assert "SupplementaryGroups=video render" in unit
    # without DESTDIR/etc/group the machine's own groups count (getent): here none at all
    (tmp_path / "root/etc/group").unlink()
    no_groups = tmp_path / "nogroups"
    no_groups.mkdir()
    (no_groups / "getent").write_text("#!/bin/sh\nexit 2\n")
    (no_groups / "getent").chmod(0o755)
    root, unit, _ = reinstall({}, path_first=no_groups)
    assert not [line for line in unit if line.startswith("SupplementaryGroups=")], unit
    verify_installed_unit(root, unit, tmp_path)


def test_each_instance_gets_a_runtime_directory_for_ipc_endpoints(installed):
    # ProtectSystem=strict: /run is read-only but for RuntimeDirectory=, where
    # publish.endpoint: ipc:///run/inspector/<camera>/defects can bind. One folder per instance, so
    # stopping one (systemd removes its folder) leaves the sockets of the others alone.
    unit = (installed / "etc/systemd/system/inspector@.service").read_text().splitlines()
    assert "ProtectSystem=strict" in unit
    assert "RuntimeDirectory=inspector/%i" in unit
    assert "ipc:///run/inspector/<camera>/defects" in (ROOT / "README.md").read_text()


# -- uninstall guard --------------------------------------------------------------------------------

def scratch_system(root: Path) -> Path:
    """A scratch root with what a line PC has beside the inspector."""
    for f in ("opt/vendor-camera-sdk/mvGenTLProducer.cti", "etc/passwd", "var/lib/dpkg/status",
              "usr/local/bin/tool", "srv/data/keep", "opt/inspector/venv/keep", "etc/inspector/cameras/a.yaml",
              "var/lib/inspector/engines/keep"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("keep\n")
    return root


@pytest.mark.parametrize("env", [
    {"PREFIX": "/opt/"}, {"PREFIX": "//opt"}, {"PREFIX": "/opt/inspector/.."}, {"PREFIX": "/opt/./"},
    {"PREFIX": "/usr/local/"}, {"PREFIX": "/srv/"}, {"PREFIX": "/"}, {"PREFIX": "///"}, {"PREFIX": "opt/inspector"},
    {"CONFDIR": "/etc/"}, {"CONFDIR": "/etc/inspector/../"}, {"STATEDIR": "/var/lib/"}, {"STATEDIR": "/var/"},
    {"STATEDIR": "/var/lib/dpkg/"},
])
def test_uninstall_refuses_system_folders_however_spelt(tmp_path, fake_bin, env):
    # PREFIX=/opt was refused, PREFIX=/opt/ removed all of /opt (and CONFDIR=/etc/ --purge /etc)
    root = scratch_system(tmp_path / "root")
    fake, log = fake_bin
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    r = run_script("uninstall.sh", {"DESTDIR": str(root), **env}, fake, "--purge")
    assert r.returncode == 2 and "refusing to remove" in r.stderr, r.stdout + r.stderr
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing removed
    assert not log.exists() or log.read_text() == "", log.read_text()


def test_uninstall_normalises_what_it_removes(tmp_path, fake_bin):
    root = scratch_system(tmp_path / "root")
    fake, _ = fake_bin
    r = run_script("uninstall.sh", {"DESTDIR": str(root), "PREFIX": "/opt//inspector/",
                                    "CONFDIR": "/etc/./inspector/", "STATEDIR": "/var/lib/x/../inspector"},
                   fake, "--purge")
    assert r.returncode == 0, r.stderr
    assert "removed /etc/systemd/system/inspector@.service and /opt/inspector" in r.stdout
    assert not (root / "opt/inspector").exists() and not (root / "etc/inspector").exists()
    assert not (root / "var/lib/inspector").exists()
    for f in ("opt/vendor-camera-sdk/mvGenTLProducer.cti", "etc/passwd", "var/lib/dpkg/status"):
        assert (root / f).is_file(), f


# -- the real-system branches, in a mount namespace ---------------------------------------------------

SCRATCH_MOUNTS = ("/run", "/etc/systemd/system", "/usr/lib/tmpfiles.d", "/usr/lib/sysusers.d", "/srv")


def scratch_namespace() -> tuple[str, ...]:
    """A wrapper command that runs the script without DESTDIR, as on a line PC, but in a private
    mount namespace where every system folder it writes is an empty tmpfs (and /run/systemd/system
    exists, so it believes systemd runs). The recorders on PATH stand in for systemctl & co."""
    exe = shutil.which("unshare")
    if exe is None or not all(os.path.isdir(d) for d in SCRATCH_MOUNTS):
        pytest.skip("no unshare, or a folder to mount over is missing")
    probe = subprocess.run([exe, "-rm", "sh", "-ec", "mount -t tmpfs none /run"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"no user/mount namespace here: {probe.stderr.decode().strip()}")
    mounts = "; ".join(f"mount -t tmpfs none {d}" for d in SCRATCH_MOUNTS)
    return (exe, "-rm", "--propagation", "private", "sh", "-ec",
            f'{mounts}; mkdir -p /run/systemd/system; echo NAMESPACE-READY; exec "$@"', "ns")


def test_uninstall_purge_resets_failed_instances_and_leaves_drop_ins(tmp_path):
    wrapper = scratch_namespace()
    fake, log = recorders(tmp_path / "fakebin")  # calls expected: not the shared recorders
    prefix, conf, state = tmp_path / "opt/inspector", tmp_path / "etc/inspector", tmp_path / "state/inspector"
    for d in (prefix, conf, state):
        d.mkdir(parents=True)
    # the user's own drop-in, made inside the namespace: install.sh writes none, uninstall keeps it
    keep_drop_in = ("mkdir -p /etc/systemd/system/inspector@.service.d && echo '[Service]' > "
                    "/etc/systemd/system/inspector@.service.d/override.conf && ")
    check = "&& test -f /etc/systemd/system/inspector@.service.d/override.conf && echo DROP-IN-KEPT"
    env = {"PREFIX": str(prefix), "CONFDIR": str(conf), "STATEDIR": str(state), "SERVICE_USER": "no-such-user-x"}
    outputs = []
    for args, resets in (((), False), (("--purge",), True)):
        log.unlink(missing_ok=True)
        # "$@": the "sh deploy/uninstall.sh ARGS" run_script appends
        r = run_script("uninstall.sh", env, fake, *args,
                       wrapper=(*wrapper, "sh", "-ec", f'{keep_drop_in} "$@" {check}', "uninstall"))
        assert "NAMESPACE-READY" in r.stdout, r.stderr
        assert r.returncode == 0 and "DROP-IN-KEPT" in r.stdout, r.stdout + r.stderr
        calls = log.read_text().splitlines()
        assert "systemctl daemon-reload" in calls
        assert ("systemctl reset-failed inspector@*" in calls) == resets, calls
        outputs.append(r.stdout)
    assert all("its drop-ins are not install.sh's" in out for out in outputs), outputs
    assert not prefix.exists() and not conf.exists() and not state.exists()


def test_install_on_the_system_owns_a_statedir_outside_var_lib(installed, tmp_path, inspector_wheel):
    """install.sh without DESTDIR, STATEDIR=/srv/inspector: created, given to the service user (no
    StateDirectory= does it at start), made writable in the unit; only existing groups are added."""
    wrapper = scratch_namespace()
    fake, log = recorders(tmp_path / "fakebin")  # calls expected: not the shared recorders
    prefix = tmp_path / "opt/inspector"
    shutil.copytree(installed / "opt/inspector", prefix, symlinks=True)  # the venv is there already
    only_video = tmp_path / "groups"
    only_video.mkdir()
    (only_video / "getent").write_text('#!/bin/sh\n[ "$1 $2" = "group video" ]\n')
    (only_video / "getent").chmod(0o755)
    show = ("cat /etc/systemd/system/inspector@.service; stat -c 'MODE %a %n' /srv/inspector "
            "/srv/inspector/engines /srv/inspector/recordings")
    r = run_script("install.sh", {"PREFIX": str(prefix), "CONFDIR": str(tmp_path / "etc/inspector"),
                                  "STATEDIR": "/srv/inspector", "PYTHON": str(Path(sys.base_prefix) / "bin/python3"),
                                  "MODELS": str(tmp_path / "none"), "PIP_ARGS": "--no-index --no-deps"},
                   fake, str(inspector_wheel), path_first=only_video,
                   wrapper=(*wrapper, "sh", "-ec", f'"$@"; {show}', "install"))
    assert "NAMESPACE-READY" in r.stdout, r.stderr
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.splitlines()
    assert "ReadWritePaths=/srv/inspector" in out and "SupplementaryGroups=video" in out
    assert not [line for line in out if line.startswith("StateDirectory=")]
    assert [line for line in out if line.startswith("MODE ")] == [
        "MODE 750 /srv/inspector", "MODE 750 /srv/inspector/engines", "MODE 750 /srv/inspector/recordings"]
    calls = log.read_text().splitlines()
    assert "chown -R inspector:inspector /srv/inspector" in calls
    assert "usermod -a -G video inspector" in calls and not any("render" in c for c in calls), calls
    assert "systemctl daemon-reload" in calls


def test_a_rerun_keeps_a_bundle_calibrated_here_and_mends_a_venv_without_pip(
        installed, fake_bin, inspector_wheel, toy_bundle, tmp_path):
    """Re-running install.sh (an upgrade) replaced every installed bundle, losing the calibration
    `calibrate thresholds` had written into it; and a venv left without pip by a failed creation
    (no python3-venv) failed every later run. Now a bundle as installed is replaced by a newer
    shipped one, a changed one is kept with the new shipped one beside it, moving that in place
    makes it "as installed" again, and a venv without pip is made again."""
    root = tmp_path / "root"
    shutil.copytree(installed, root, symlinks=True)
    models = tmp_path / "models"
    shutil.copytree(toy_bundle, models / "toy")
    fake, _ = fake_bin
    env = {"DESTDIR": str(root), "PYTHON": str(Path(sys.base_prefix) / "bin" / "python3"),
           "MODELS": str(models), "PIP_ARGS": "--no-index --no-deps"}
    toy = root / "opt/inspector/models/toy"
    shipped = toy.parent / "toy.shipped"

    def install() -> str:
        r = run_script("install.sh", env, fake, str(inspector_wheel))
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def release(tag: str) -> str:
        text = (toy_bundle / "bundle.yaml").read_text() + f"# {tag}\n"
        (models / "toy" / "bundle.yaml").write_text(text)
        return text

    out = install()  # the same release again: nothing to do, nothing said
    assert "toy" not in out and not shipped.exists()
    calibrated = (toy / "bundle.yaml").read_text() + "# calibrated here\n"
    (toy / "bundle.yaml").write_text(calibrated)
    out = install()  # the same release after a calibration: nothing new to offer
    assert "toy" not in out and not shipped.exists() and (toy / "bundle.yaml").read_text() == calibrated
    v2 = release("v2")
    site = next((root / "opt/inspector/venv/lib").glob("python3*/site-packages"))
    for p in site.glob("pip*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out = install()
    assert "has no pip (left by a failed creation?): creating it again" in out
    assert "/opt/inspector/models/toy was changed here (calibrated?) since it was installed: kept" in out
    assert (toy / "bundle.yaml").read_text() == calibrated and (shipped / "bundle.yaml").read_text() == v2
    venv_python = root / "opt/inspector/venv/bin/python"
    assert subprocess.run([str(venv_python), "-m", "pip", "--version"], capture_output=True).returncode == 0
    # the user takes the shipped one (the warning's advice): the next release replaces it
    shutil.rmtree(toy)
    shipped.rename(toy)
    v3 = release("v3")
    out = install()
    assert "model bundle /opt/inspector/models/toy" in out and (toy / "bundle.yaml").read_text() == v3
    # an install from before the checksums were kept: cannot tell, so kept and said so
    (root / "opt/inspector/models/.installed/toy.sha256").unlink()
    release("v4")
    out = install()
    assert "installed before install.sh kept checksums, so whether it was changed here" in out
    assert (toy / "bundle.yaml").read_text() == v3

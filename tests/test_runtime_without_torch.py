"""Line PCs install the runtime only: it must import and run with torch absent."""

import json
import subprocess
import sys

from conftest import ROOT, write_config

BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == 'torch' or name.startswith('torch.'):
            raise ImportError('torch is not installed on this line PC (blocked by the test)')
sys.meta_path.insert(0, _NoTorch())
from inspector.cli import main
rc = main(sys.argv[1:])
assert 'torch' not in sys.modules, 'the runtime imported torch'
sys.exit(rc)
"""


def test_check_and_run_without_torch(tmp_path, synthetic_cfg):
    p = write_config(tmp_path / "cam.yaml", synthetic_cfg())
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "check", "--config", str(p), "--json"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["result"] == "ok"
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "run", "--config", str(p), "--frames", "5",
                        "--quiet"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_fuzzymask_kind_checks_without_torch(tmp_path):
    """The fuzzymask runtime (inspector.models.fuzzymask) loads and runs a frame with torch blocked."""
    from toy_models import fuzzymask_toy_bundle

    bundle = fuzzymask_toy_bundle(tmp_path / "fm")
    p = write_config(tmp_path / "cam.yaml", {
        "camera_id": "fm", "model": {"bundle": str(bundle)},
        "source": {"type": "synthetic", "width": 200, "height": 64, "fps": 0, "seed": 1}})
    probe = BLOCK_TORCH.replace("rc = main(sys.argv[1:])",
                                "import inspector.models.fuzzymask\nrc = main(sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", probe, "check", "--config", str(p), "--json"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["result"] == "ok"


def test_train_without_torch_says_what_to_install(tmp_path):
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "train", "arcd", "--config", "x.yaml"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "pip install" in r.stderr and "train" in r.stderr

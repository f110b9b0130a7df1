"""A training config asking for a device this machine lacks (`device: cuda` copied from the GPU
box onto a CPU-only line PC, a typo, a GPU index that does not exist) is refused before any run
folder is made: one line naming the file and the `device` key, exit 2, not torch's traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")

from conftest import run_cli  # noqa: E402
from export.training import check_device  # noqa: E402
from inspector.errors import ConfigError  # noqa: E402

NO_GPU = not torch.cuda.is_available()


def _with_device(src: str, device: str, tmp_path: Path) -> Path:
    cfg = yaml.safe_load(Path(src).read_text())
    cfg["device"] = device
    out = tmp_path / Path(src).name
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


@pytest.mark.parametrize("spec", ["cpu", "auto"])
def test_cpu_and_auto_are_always_accepted(spec):
    check_device(spec, "c.yaml")


def test_a_word_that_is_not_a_device_is_named():
    with pytest.raises(ConfigError) as e:
        check_device("gpu", "c.yaml")
    assert str(e.value) == "c.yaml: device: 'gpu' is not a device; use auto, cpu, cuda or cuda:N"


@pytest.mark.skipif(not NO_GPU, reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_named(spec):
    with pytest.raises(ConfigError) as e:
        check_device(spec, "c.yaml")
    assert f"c.yaml: device: '{spec}', but torch {torch.__version__}" in str(e.value)
    assert "sees no CUDA GPU; set device: cpu or auto" in str(e.value)


@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU to name a missing index")
def test_a_gpu_index_past_the_last_is_named():
    n = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=rf"'cuda:{n}', but torch sees {n} GPU"):
        check_device(f"cuda:{n}", "c.yaml")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("kind, src", [
    ("arcd", "configs/train/arcd-demo.yaml"),
    ("clgan", "configs/train/clgan-mt.yaml"),
    ("fuzzymask", "configs/train/fuzzymask-mt.yaml"),
])
def test_train_refuses_cuda_on_a_cpu_only_machine_before_making_the_run(kind, src, tmp_path):
    cfg = _with_device(src, "cuda", tmp_path)
    run = tmp_path / "run"
    r = run_cli("train", kind, "--config", str(cfg), "--run-dir", str(run), timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert f"{cfg}: device: 'cuda'" in r.stderr and "set device: cpu or auto" in r.stderr
    assert not run.exists()


def test_arcd_accepts_auto(tmp_path):
    """`auto` (the other trainers' default) is a valid ARCD device too: the CPU here. ARCD now
    takes its device from the shared start_ranks, so a whole (tiny) run is trained with it."""
    from export.arcd.train import train
    from export.training import start_ranks
    from test_arcd_offline import TINY

    _, dev = start_ranks("auto", torch.get_num_threads(), 0, "c.yaml")
    assert dev.type == ("cpu" if NO_GPU else "cuda")
    cfg = tmp_path / "tiny-auto.yaml"
    cfg.write_text(yaml.safe_dump(dict(TINY, device="auto")))
    run = train(cfg, tmp_path / "run")
    assert (run / "metrics.json").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["device"] == "auto"

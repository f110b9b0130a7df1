"""A path that exists but is of the wrong kind says so (sweep 25, C1).

"folder not found" for a file given where a folder was meant (or the reverse) sent the engineer
to ``ls``, which showed the path there. Each reader now names what the path is."""

from __future__ import annotations

from pathlib import Path

import pytest

from inspector.engines.trt_build import calibration_files
from inspector.errors import EngineError, InspectorError
from inspector.evaluation.datasets import image_folder, magnetic_tile, neu_seg
from inspector.fileio import missing_folder
from inspector.flatfield import FlatField


@pytest.fixture
def a_file(tmp_path) -> Path:
    f = tmp_path / "garbage.bin"
    f.write_bytes(b"\0" * 16)
    return f


def test_missing_folder_tells_a_file_from_nothing_from_a_dangling_link(tmp_path, a_file):
    assert missing_folder(a_file, "run folder") == "is a file, not a run folder"
    assert missing_folder(tmp_path / "nope", "run folder") == "run folder not found"
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert "a link to a path that does not exist" in missing_folder(tmp_path / "dangling", "folder")


@pytest.mark.parametrize("reader, what", [(neu_seg, "NEU-Seg root"),
                                          (magnetic_tile, "magnetic-tile root"),
                                          (image_folder, "image folder")])
def test_dataset_readers_say_a_file_is_a_file(reader, what, a_file, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{a_file}: is a file, not an? {what}"):
        reader(a_file)
    with pytest.raises(FileNotFoundError, match="not found"):
        reader(tmp_path / "nope")


def test_int8_calibration_folder_that_is_a_file(a_file):
    with pytest.raises(EngineError, match="is a file, not an INT8 calibration folder"):
        calibration_files(a_file)


def test_flat_field_that_is_a_folder(tmp_path):
    with pytest.raises(ValueError, match="is a folder, expected a flat-field .npz file"):
        FlatField.load(tmp_path)
    with pytest.raises(ValueError, match="flat-field file not found"):
        FlatField.load(tmp_path / "ff.npz")


def test_calibration_normal_folder_that_is_a_file(a_file):
    from calibration.frames import normal_folder

    with pytest.raises(InspectorError, match=f"--normal {a_file}: is a file, not a folder"):
        normal_folder(a_file, "all")


def test_augment_folders_that_are_files(a_file):
    pytest.importorskip("torch")
    from export.augment.anomalyalign.sample import find_data_root
    from export.augment.cli_common import check_run_dir
    from export.augment.dataset import open_pairs

    with pytest.raises(FileNotFoundError, match="--run-dir .*: is a file, not a run folder"):
        check_run_dir(a_file)
    with pytest.raises(FileNotFoundError, match="is a file, not a folder of generated pairs"):
        open_pairs(a_file)
    with pytest.raises(FileNotFoundError, match="--data-root .*: is a file, not a NEU-Seg root"):
        find_data_root({}, None, a_file, data_root=a_file)
    with pytest.raises(FileNotFoundError, match="--data-root .*: not a NEU-Seg root"):
        find_data_root({}, None, a_file, data_root=a_file.parent)


def test_calibrate_normal_and_evaluate_checkpoint_on_the_command_line(a_file, tmp_path):
    pytest.importorskip("torch")
    from conftest import DEMO_BUNDLE, run_cli
    from test_arcd_neu import neu_folder

    res = run_cli("calibrate", "thresholds", "--bundle", str(DEMO_BUNDLE), "--normal", str(a_file), "--target-fpr", "0.01",
                  "--dry-run")
    assert res.returncode == 2 and f"--normal {a_file}: is a file, not a folder" in res.stderr, res.stderr
    res = run_cli("evaluate", "--bundle", str(DEMO_BUNDLE), "--format", "neu-seg", "--data",
                  str(neu_folder(tmp_path / "neu", n=2)), "--engine", "torch", "--checkpoint", str(tmp_path))
    assert res.returncode == 2 and "is a folder, expected the" in res.stderr, res.stderr

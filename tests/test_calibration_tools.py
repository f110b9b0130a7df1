"""Flat-field, geometry and INT8 frame sets (calibration/), and the calibrate commands' error paths."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from conftest import SHARED_DATA, free_endpoint, run_cli, write_config

W, H = 320, 48


def gradient_scene(rng: np.random.Generator, reflectance: np.ndarray | float, dark: np.ndarray,
                   noise: float = 1.5) -> np.ndarray:
    """A frame lit with a linear fall-off across the width (1.0 -> 0.55) plus a fixed dark level."""
    illum = np.linspace(1.0, 0.55, W, dtype=np.float32)[None, :]
    img = dark + reflectance * illum + rng.normal(0, noise, (H, W))
    return np.clip(img, 0, 255).astype(np.uint8)


def spread_pct(img: np.ndarray) -> float:
    """(max - min) / mean of the brightness of 20 bands across the width, in %: the gradient,
    not the pixel noise (a band averages 16 columns x all rows)."""
    bands = img.astype(np.float64).mean(axis=0).reshape(20, -1).mean(axis=1)
    return float((bands.max() - bands.min()) / bands.mean() * 100)


@pytest.fixture
def dark_level():
    rng = np.random.default_rng(11)
    # a dark level that varies per column (fixed-pattern offset) around 12 grey levels
    return (12 + rng.normal(0, 2, W)).astype(np.float32)[None, :]


def _write(folder: Path, frames: list[np.ndarray], prefix: str = "f") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{prefix}{i:03d}.png"), f)
    return folder


def test_flat_field_from_dark_and_bright_references_flattens_a_gradient(tmp_path, dark_level):
    from inspector.flatfield import FlatField

    rng = np.random.default_rng(1)
    dark = _write(tmp_path / "dark", [gradient_scene(rng, 0.0, dark_level) for _ in range(8)])
    bright = _write(tmp_path / "bright", [gradient_scene(rng, 200.0, dark_level) for _ in range(8)])
    out = tmp_path / "ff.npz"
    r = run_cli("calibrate", "flat-field", "--dark", str(dark), "--bright", str(bright), "--out", str(out),
                "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["config"] == {"preprocess": {"flat_field": str(out)}}
    assert Path(res["plot"]).is_file()
    ff = FlatField.load(out)
    assert ff.shape == (H, W) and ff.meta["method"] == "dark/bright references"
    # a new frame of a uniform surface at another brightness
    scene = gradient_scene(np.random.default_rng(2), 150.0, dark_level)
    assert spread_pct(scene) > 30
    corrected = ff.apply(scene)
    assert corrected.dtype == np.uint8 and corrected.shape == scene.shape
    assert spread_pct(corrected) < 2.0
    # the buffers are reused: no allocation per frame
    assert ff.apply(scene) is corrected
    rgb = np.repeat(scene[:, :, None], 3, axis=2)
    assert spread_pct(ff.apply(rgb)[:, :, 1]) < 2.0


def test_flat_field_from_the_median_of_moving_textured_frames(tmp_path, dark_level):
    from calibration.flat_field import FlatFieldSettings, compute_flat_field, stack_frames
    from inspector.flatfield import FlatField

    rng = np.random.default_rng(3)
    frames = []
    for _ in range(25):  # a moving strip: texture and a few defects differ from frame to frame
        refl = 170 + 25 * cv2.GaussianBlur(rng.normal(0, 1, (H, W)).astype(np.float32), (0, 0), 2.0)
        if rng.random() < 0.3:
            y, x = rng.integers(0, H - 8), rng.integers(0, W - 8)
            refl[y:y + 8, x:x + 8] -= 90
        frames.append(gradient_scene(rng, refl, dark_level))
    stack, _ = stack_frames(((str(i), f) for i, f in enumerate(frames)), "test")
    darks, _ = stack_frames(((str(i), gradient_scene(rng, 0.0, dark_level)) for i in range(5)), "dark")
    dark = darks.mean(axis=0)
    ff = compute_flat_field(np.median(stack, axis=0), dark, FlatFieldSettings(smooth_px=4.0),
                            {"method": "median"})
    scene = gradient_scene(np.random.default_rng(4), 120.0, dark_level)
    assert spread_pct(ff.apply(scene)) < 2.0
    path = ff.save(tmp_path / "m.npz")
    assert FlatField.load(path).meta["method"] == "median"
    # columns profile: 1xW maps, the same correction for a frame of any height
    ffc = compute_flat_field(np.median(stack, axis=0), dark, FlatFieldSettings("columns", smooth_px=4.0))
    assert ffc.shape == (1, W)
    assert spread_pct(ffc.apply(scene)) < 2.0
    assert spread_pct(ffc.apply(np.vstack([scene, scene]))) < 2.0


def test_flat_field_is_applied_on_the_adapter_input(toy_bundle, tmp_path, dark_level):
    from calibration.flat_field import FlatFieldSettings, compute_flat_field
    from inspector.config import load_config
    from inspector.errors import ConfigError
    from inspector.pipeline import load_model

    rng = np.random.default_rng(5)
    bright = np.mean([gradient_scene(rng, 200.0, dark_level) for _ in range(6)], axis=0)
    ff = compute_flat_field(bright.astype(np.float32), dark_level.repeat(H, 0), FlatFieldSettings())
    ff.save(tmp_path / "ff.npz")
    cfg_path = write_config(tmp_path / "cam.yaml", {
        "camera_id": "ff", "model": {"bundle": str(toy_bundle)}, "preprocess": {"flat_field": "ff.npz"},
        "source": {"type": "synthetic", "width": W, "height": H, "fps": 0}})
    model = load_model(load_config(cfg_path))
    assert model.adapter.flat_field is not None
    scene = gradient_scene(rng, 150.0, dark_level)
    scene[20:23, 100:103] = 30  # a dark spot the toy model flags
    out = model.adapter.infer(scene)
    got = np.array(out.score_map, copy=True)
    out.release()
    model.adapter.flat_field = None
    ref = model.adapter.infer(ff.apply(scene))
    np.testing.assert_allclose(got, ref.score_map, atol=1e-6)
    # errors name the key
    bad = write_config(tmp_path / "bad.yaml", {
        "camera_id": "ff", "model": {"bundle": str(toy_bundle)}, "preprocess": {"flat_field": "none.npz"},
        "source": {"type": "synthetic", "width": W, "height": H, "fps": 0}})
    with pytest.raises(ConfigError, match="preprocess.flat_field"):
        load_config(bad)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    junk = write_config(tmp_path / "junk.yaml", {
        "camera_id": "ff", "model": {"bundle": str(toy_bundle)}, "preprocess": {"flat_field": "junk.npz"},
        "source": {"type": "synthetic", "width": W, "height": H, "fps": 0}})
    with pytest.raises(ConfigError, match="preprocess.flat_field.*junk.npz"):
        load_model(load_config(junk))
    model.adapter.flat_field = ff
    from inspector.errors import FrameError
    with pytest.raises(FrameError, match="flat-field maps are 320x48"):
        model.adapter.infer(np.zeros((H, W + 1), np.uint8))


def strip_frame(rows: int = 250) -> np.ndarray:
    """A bright strip from column 100 to 900 (800 px) on a dark roller, 1000 px wide."""
    img = np.full((rows, 1000), 25, np.uint8)
    img[:, 100:900] = 190
    return img


def test_geometry_from_strip_width_and_line_speed_maps_a_box_to_mm(tmp_path):
    from calibration.geometry import strip_edges, target_size_px
    from inspector.postprocess import Geometry, components

    left, right = strip_edges(strip_frame())
    assert abs(left - 100) < 0.05 and abs(right - 900) < 0.05
    cv2.imwrite(str(tmp_path / "strip.png"), strip_frame())
    # 1600 mm strip over 800 px; 60 m/min at 10 frames/s of 250 rows -> 100 mm per frame
    r = run_cli("calibrate", "geometry", "--strip-width-mm", "1600", "--image", str(tmp_path / "strip.png"),
                "--line-speed-m-min", "60", "--frame-rate", "10", "--out", str(tmp_path / "geo.yaml"))
    assert r.returncode == 0, r.stderr
    geo = yaml.safe_load((tmp_path / "geo.yaml").read_text())["geometry"]
    assert geo == {"mm_per_px_across": 2.0, "mm_per_px_along": 0.4}
    assert "geometry:" in r.stdout
    # a 10 x 20 px box (W x H) with its top at row 30 of frame 5
    label = np.zeros((250, 1000), np.uint8)
    label[30:50, 400:410] = 1
    g = Geometry(**geo)
    pos = g.frame_pos_mm(5, 250, {}, 0.0)
    assert pos == pytest.approx(500.0)
    (d,), _ = components(label, label.astype(np.float32), ["background", "defect"], geometry=g,
                         strip_pos_mm=pos)
    assert d["area_mm2"] == pytest.approx(10 * 2.0 * 20 * 0.4)
    assert d["strip_pos_mm"] == pytest.approx(500.0 + 39.5 * 0.4, abs=0.05)
    # an encoder count in the frame metadata wins over the frame number
    ge = Geometry(2.0, 0.4, mm_per_encoder_count=0.05)
    assert ge.frame_pos_mm(5, 250, {"encoder_count": 123456}, 0.0) == pytest.approx(6172.8)
    # a target of known size: 50 mm x 25 mm square-ish plate seen as 125 x 62.5 px
    tgt = np.full((200, 300), 200, np.uint8)
    tgt[60:123, 80:205] = 40
    w, h = target_size_px(tgt)
    assert (w, h) == pytest.approx((125, 63), abs=0.01)
    cv2.imwrite(str(tmp_path / "target.png"), tgt)
    r = run_cli("calibrate", "geometry", "--target-mm", "50x25.2", "--image", str(tmp_path / "target.png"),
                "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["geometry"] == {"mm_per_px_across": 0.4, "mm_per_px_along": 0.4}
    r = run_cli("calibrate", "geometry", "--strip-width-mm", "1600", "--strip-width-px", "800",
                "--encoder-mm-per-count", "0.05", "--counts-per-frame", "2000", "--frame-height", "250", "--json")
    assert json.loads(r.stdout)["geometry"] == {"mm_per_px_across": 2.0, "mm_per_px_along": 0.4,
                                                "mm_per_encoder_count": 0.05}


def test_published_defects_carry_mm_and_alarms_use_them(toy_bundle, tmp_path):
    """The geometry snippet in a camera config: the pipeline publishes area_mm2 and strip_pos_mm
    (the replay source knows no pixel size) and an alarm rule in mm² fires on them."""
    from inspector.alarms.config import AlarmsConfig
    from inspector.alarms.rules import AlarmEngine
    from inspector.config import load_config
    from inspector.pipeline import Pipeline

    frames = tmp_path / "rec"
    frames.mkdir()
    for i in range(2):
        img = np.full((64, 128), 200, np.uint8)
        img[20:25, 60:63] = 40  # 3 x 5 px dark box: the toy graph flags exactly these 15 px
        cv2.imwrite(str(frames / f"f{i}.png"), img)
    cfg = load_config(write_config(tmp_path / "cam.yaml", {
        "camera_id": "geo", "model": {"bundle": str(toy_bundle)},
        "source": {"type": "replay", "path": "rec", "fps": 0},
        "publish": {"endpoint": free_endpoint(), "connect_grace_s": 0.0},
        "geometry": {"mm_per_px_across": 2.0, "mm_per_px_along": 0.4}}))
    headers: list[dict] = []
    with Pipeline(cfg, on_report=headers.append) as p:
        p.run(frames=2)
    assert [h["frame_id"] for h in headers] == [0, 1]
    h = headers[1]
    assert h["strip_pos_mm"] == pytest.approx(64 * 0.4)
    (d,) = h["defects"]
    assert d["area_px"] == 15 and d["area_mm2"] == pytest.approx(15 * 2.0 * 0.4)
    assert d["strip_pos_mm"] == pytest.approx(64 * 0.4 + 22 * 0.4, abs=0.05)
    rules = AlarmsConfig.model_validate({"rules": [{"name": "big", "min_area_mm2": 10.0},
                                                   {"name": "huge", "min_area_mm2": 13.0}]})
    eng = AlarmEngine(rules, classes=["background", "inclusion", "patches", "scratches"])
    eng.on_frame(h)
    assert eng.active() == {"big": True, "huge": False}


def test_int8_set_covers_brightness_and_texture(tmp_path):
    from inspector.engines.trt_build import calibration_files

    rng = np.random.default_rng(7)
    src = tmp_path / "pool"
    src.mkdir()
    levels = rng.uniform(40, 220, 80)
    grains = rng.uniform(1, 25, 80)
    for i, (lv, gr) in enumerate(zip(levels, grains)):
        img = lv + gr * cv2.GaussianBlur(rng.normal(0, 1, (64, 96)).astype(np.float32), (0, 0), 1.0)
        cv2.imwrite(str(src / f"p{i:03d}.png"), np.clip(img, 0, 255).astype(np.uint8))
    out = tmp_path / "int8"
    r = run_cli("calibrate", "int8-set", "--source", str(src), "--count", "10", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "selection.json").read_text())
    assert rep["count"] == 10 and rep["pool"] == 80 and len(calibration_files(out)) == 10
    assert rep["range_covered"]["mean"] >= 0.9 and rep["range_covered"]["std"] >= 0.8
    # deterministic, and better spread than the first ten frames
    first = [s["source"] for s in rep["selected"]]
    r = run_cli("calibrate", "int8-set", "--source", str(src), "--count", "10", "--out", str(out),
                "--overwrite", "--json")
    assert r.returncode == 0, r.stderr
    assert [s["source"] for s in json.loads(r.stdout)["selected"]] == first
    assert np.ptp(levels[:10]) < np.ptp([s["features"]["mean"] for s in rep["selected"]])
    # from a camera config's source
    cfg = write_config(tmp_path / "cam.yaml", {"camera_id": "i8", "model": {"bundle": "b"},
                                               "source": {"type": "replay", "path": "pool", "fps": 0}})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bundle.yaml").write_text("{}")
    r = run_cli("calibrate", "int8-set", "--config", str(cfg), "--count", "4", "--pool", "30",
                "--out", str(tmp_path / "i8b"))
    assert r.returncode == 0, r.stderr
    assert len(calibration_files(tmp_path / "i8b")) == 4


@pytest.mark.parametrize("args, names", [
    (["thresholds", "--bundle", "B", "--normal", "EMPTY", "--target-fpr", "0.02"], ["--normal", "EMPTY"]),
    (["thresholds", "--bundle", "NOPE", "--normal", "NORMAL", "--target-fpr", "0.02"], ["NOPE", "not found"]),
    (["thresholds", "--bundle", "B", "--normal", "NORMAL", "--target-fpr", "1.5"], ["--target-fpr", "1.5"]),
    (["thresholds", "--bundle", "B", "--normal", "NORMAL", "--target-fpr", "0"], ["--target-fpr"]),
    (["thresholds", "--bundle", "B", "--normal", "NORMAL", "--target-fpr", "0.02", "--defects", "NOPE",
      "--format", "magnetic-tile"], ["NOPE"]),
    (["thresholds", "--bundle", "B", "--normal", "NORMAL", "--target-fpr", "0.02", "--k1", "2,x"], ["--k1"]),
    (["thresholds", "--bundle", "B", "--normal", "NORMAL", "--target-fpr", "0.02", "--k1", "2.5,3"],
     ["--defects"]),
    (["flat-field", "--normal", "EMPTY", "--out", "OUT/x.npz"], ["--normal", "EMPTY"]),
    (["flat-field", "--bright", "NORMAL", "--out", "OUT/x.txt"], ["--out"]),
    (["int8-set", "--source", "EMPTY", "--count", "3", "--out", "OUT/i8"], ["--source", "EMPTY"]),
    (["int8-set", "--source", "NORMAL", "--count", "0", "--out", "OUT/i8"], ["--count"]),
    (["flat-field", "--normal", "BROKEN", "--out", "OUT/x.npz"], ["--normal", "BROKEN", "broken.png"]),
    (["flat-field", "--bright", "BROKEN", "--out", "OUT/x.npz"], ["--bright", "broken.png"]),
    (["int8-set", "--source", "BROKEN", "--count", "2", "--out", "OUT/i8"], ["--source", "broken.png"]),
    (["geometry", "--strip-width-mm", "-3", "--strip-width-px", "100"], ["--strip-width-mm"]),
    (["geometry"], ["nothing to calibrate"]),
])
def test_bad_input_exits_2_naming_the_argument_or_file(args, names, tmp_path):
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from test_calibration import local_mean_clgan_bundle

    (tmp_path / "empty").mkdir()
    normal = tmp_path / "normal"
    _write(normal, [np.full((64, 64), 128, np.uint8)] * 3)
    broken = _write(tmp_path / "broken", [np.full((64, 64), v, np.uint8) for v in (90, 128, 160)])
    (broken / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    subst = {"B": str(tmp_path / "b"), "EMPTY": str(tmp_path / "empty"), "NORMAL": str(normal),
             "BROKEN": str(broken),
             "NOPE": str(tmp_path / "nope"), "OUT/x.npz": str(tmp_path / "x.npz"),
             "OUT/x.txt": str(tmp_path / "x.txt"), "OUT/i8": str(tmp_path / "i8")}
    if "B" in args:
        local_mean_clgan_bundle(tmp_path / "b")
    r = run_cli("calibrate", *[subst.get(a, a) for a in args])
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("inspector: error: ")
    for n in names:
        assert subst.get(n, n) in err, err


def test_int8_set_with_an_unreadable_pool_frame_keeps_the_previous_set(tmp_path):
    src = _write(tmp_path / "src", [np.full((32, 32), v, np.uint8) for v in (10, 100, 200)])
    out = tmp_path / "out"
    assert run_cli("calibrate", "int8-set", "--source", str(src), "--count", "2", "--out", str(out)).returncode == 0
    before = sorted(p.name for p in out.iterdir())
    (src / "zz_broken.png").write_bytes(b"not an image")
    r = run_cli("calibrate", "int8-set", "--source", str(src), "--count", "2", "--out", str(out), "--overwrite")
    assert r.returncode == 2 and "zz_broken.png" in r.stderr.strip().splitlines()[-1], r.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_int8_out_folder_with_images_is_refused(tmp_path):
    src = _write(tmp_path / "src", [np.full((32, 32), v, np.uint8) for v in (10, 100, 200)])
    out = _write(tmp_path / "out", [np.zeros((8, 8), np.uint8)], prefix="old")
    r = run_cli("calibrate", "int8-set", "--source", str(src), "--count", "2", "--out", str(out))
    assert r.returncode == 2 and "--overwrite" in r.stderr and str(out) in r.stderr


@pytest.mark.skipif(not (SHARED_DATA / "magnetic_tile" / "MT_Free" / "Imgs").is_dir(),
                    reason="needs ../shared/data/magnetic_tile (the shared data folder is absent)")
def test_shared_magnetic_tile_normals_split_like_the_training_data():
    """MT_Free/Imgs holds .jpg images and .png masks: the masks are not frames, and the check /
    calibration parts at 0.3 / 0.2 are exactly the shared test / val splits."""
    from calibration.frames import Split, normal_folder
    from inspector.evaluation.datasets import image_folder, magnetic_tile

    root = SHARED_DATA / "magnetic_tile"
    fs = normal_folder(root / "MT_Free" / "Imgs", Split(0.3, 0.2))
    assert all(it.path.suffix == ".jpg" for it in fs.items)
    for part, split in (("check", "test"), ("calibration", "val"), ("unused", "train")):
        ds = magnetic_tile(root, split=split, categories=["MT_Free"])
        assert sorted(it.path.stem for it in fs.part(part)) == sorted(e.stem for e in ds.entries)
    # the parent folder splits as `--format folder` does on it (by the path below it), and the
    # masks are still skipped
    fs2 = normal_folder(root / "MT_Free", Split(0.3, 0.2))
    assert sum(fs2.counts().values()) == len(fs.items)
    for part, split in (("check", "test"), ("calibration", "val"), ("unused", "train")):
        ds = image_folder(root / "MT_Free", split=split)
        assert {it.path for it in fs2.part(part)} == {e.image for e in ds.entries if e.image.suffix == ".jpg"}


def test_normal_folder_splits_like_the_folder_data_set(tmp_path):
    """Calibration parts are the `--format folder` splits of the same folder (0.3/0.2 = test/val):
    with sub-folders the key is the path below the folder, so equal names split independently;
    for files directly in the folder it is the bare stem, as before."""
    from calibration.frames import Split, normal_folder
    from inspector.evaluation.datasets import image_folder

    for sub in ("coil_a", "coil_b"):
        _write(tmp_path / "nested" / sub, [np.zeros((8, 8), np.uint8)] * 60)
    flat = _write(tmp_path / "flat", [np.zeros((8, 8), np.uint8)] * 60)
    for root in (tmp_path / "nested", flat):
        fs = normal_folder(root, Split(0.3, 0.2))
        for part, split in (("check", "test"), ("calibration", "val"), ("unused", "train")):
            assert {it.path for it in fs.part(part)} == {e.image for e in image_folder(root, split=split).entries}
    # flat folder: the same parts as hashing the file stem
    fs = normal_folder(flat, Split(0.3, 0.2))
    assert all(it.part == Split(0.3, 0.2).part(it.path.stem) for it in fs.items)
    assert len(fs.part("check")) > 0
    # nested: f0000 of coil_a and coil_b are two frames with keys of their own
    nested = normal_folder(tmp_path / "nested", Split(0.3, 0.2))
    parts = {it.name: it.part for it in nested.items}
    assert any(parts[f"coil_a/f{i:03d}"] != parts[f"coil_b/f{i:03d}"] for i in range(60))


def test_int8_set_never_repeats_a_frame_of_a_pool_of_copies(tmp_path):
    """A pool of repeated frames (a stopped line): k-center greedy stops once every frame left
    is a copy of a picked one, instead of picking the same frame again."""
    from calibration.int8_set import k_center_greedy

    z = np.array([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    picks, radius = k_center_greedy(z, 4)
    assert len(set(picks)) == len(picks) == 2 and radius == 0.0
    assert len({tuple(z[i]) for i in picks}) == 2
    distinct = np.arange(12, dtype=float).reshape(6, 2) ** 1.5
    assert sorted(k_center_greedy(distinct, 6)[0]) == list(range(6))

    src = _write(tmp_path / "src", [np.full((32, 32), v, np.uint8) for v in (40, 200) for _ in range(5)])
    out = tmp_path / "i8"
    r = run_cli("calibrate", "int8-set", "--source", str(src), "--count", "4", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["count"] == 2 and len({s["source"] for s in rep["selected"]}) == 2
    assert len([p for p in out.iterdir() if p.suffix == ".png"]) == 2
    assert "only 2 distinct frames" in r.stderr


@pytest.mark.parametrize("args", [
    ["thresholds", "--bundle", "B", "--normal", "NORMAL", "--target-fpr", "0.5", "--threads", "1",
     "--out", "AFILE/rep"],
    ["flat-field", "--normal", "NORMAL", "--out", "AFILE/x.npz"],
    ["geometry", "--strip-width-mm", "1600", "--strip-width-px", "800", "--out", "AFILE/geo.yaml"],
    ["int8-set", "--source", "NORMAL", "--count", "2", "--out", "AFILE/i8"],
    ["dual-threshold", "--bundle", "B", "--data", "NORMAL", "--format", "folder", "--split", "all",
     "--range", "3,4", "--out", "AFILE/sweep"],
    ["residual-window", "--bundle", "B", "--data", "NORMAL", "--format", "folder", "--split", "all",
     "--windows", "0,15", "--out", "AFILE/sweep"],
    ["thresholds", "--bundle", "B", "--normal", "NORMAL", "--target-fpr", "0.5", "--out", "AFILE"],
    ["flat-field", "--normal", "NORMAL", "--out", "ADIR.npz"],
], ids=["thresholds", "flat-field", "geometry", "int8-set", "dual-threshold", "residual-window",
        "thresholds-out-is-a-file", "flat-field-out-is-a-folder"])
def test_an_out_that_cannot_be_written_exits_2_naming_out_and_leaves_the_bundle(args, tmp_path):
    """--out below a regular file (or a file where a folder goes, and the reverse): one line naming
    --out, exit 2, and the bundle not rewritten (thresholds used to write it first)."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from test_calibration import local_mean_clgan_bundle

    rng = np.random.default_rng(0)
    normal = _write(tmp_path / "normal", [np.clip(128 + rng.normal(0, 6, (64, 64)), 0, 255).astype(np.uint8)
                                          for _ in range(12)])
    bundle = local_mean_clgan_bundle(tmp_path / "b")
    before = (bundle / "bundle.yaml").read_text()
    afile = tmp_path / "afile"
    afile.write_text("a regular file")
    (tmp_path / "adir.npz").mkdir()
    subst = {"B": str(bundle), "NORMAL": str(normal), "AFILE": str(afile),
             "ADIR.npz": str(tmp_path / "adir.npz")}
    args = [subst.get(a, a.replace("AFILE", str(afile))) for a in args]
    r = run_cli("calibrate", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("inspector: error: ")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    out = args[args.index("--out") + 1]
    assert lines[0].startswith(f"inspector: error: --out {out}: "), lines[0]
    assert "Errno" not in lines[0]
    assert (bundle / "bundle.yaml").read_text() == before
    assert afile.read_text() == "a regular file"


def test_out_checks_look_without_creating(tmp_path):
    from calibration.frames import CalibrationInputError
    from calibration.outputs import check_out_dir, check_out_file, make_out_dir

    assert check_out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert check_out_file(tmp_path / "c" / "x.npz") == tmp_path / "c" / "x.npz"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created by a check
    (tmp_path / "f").write_text("x")
    for fn, arg in ((check_out_dir, tmp_path / "f" / "o"), (check_out_file, tmp_path / "f" / "o.npz"),
                    (check_out_dir, tmp_path / "f"), (make_out_dir, tmp_path / "f" / "o")):
        with pytest.raises(CalibrationInputError, match=r"^--out "):
            fn(arg)
    assert make_out_dir(tmp_path / "m" / "n").is_dir()

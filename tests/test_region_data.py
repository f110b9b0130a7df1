"""Machine-region labels on disk and in training data (contract sections 1-2): the NEU-Seg
``regions/<subset>/<stem>.png`` reader, its errors, and the stage-2 tiles' ``region`` key cut,
padded and flipped exactly like the image.

Fixtures are tiny NEU-Seg-layout folders written into ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from inspector.evaluation.datasets import open_dataset

# the fixture images are 30 where the region is and 200 elsewhere (PNG, lossless), so an image
# tile tells exactly which of its pixels must be region
REGION_GREY, OTHER_GREY = 200, 30


def region_of(i: int, h: int, w: int) -> np.ndarray:
    """Image i's region: a vertical band whose place depends on i, plus a corner block, so flips
    and crops move it visibly (not symmetric)."""
    r = np.zeros((h, w), np.uint8)
    x0 = 3 + 5 * (i % 4)
    r[:, x0:x0 + 9] = 1
    r[: h // 3, w - w // 4:] = 1
    return r


def neu_region_folder(root: Path, n: int = 6, h: int = 40, w: int = 56, subset: str = "training",
                      regions: bool = True, region_scale: int = 255, first: int = 0) -> Path:
    """NEU-Seg layout: grey PNG images whose grey level shows the region, a defect rectangle of
    class i % 3 + 1 in the annotation, and (``regions``) the region PNGs (nonzero = region, its
    nonzero value ``region_scale``)."""
    for d in ("images", "annotations") + (("regions",) if regions else ()):
        (root / d / subset).mkdir(parents=True, exist_ok=True)
    for i in range(first, first + n):
        reg = region_of(i, h, w)
        img = np.where(reg > 0, REGION_GREY, OTHER_GREY).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[5:12, 20:30] = i % 3 + 1  # the defect overlaps the region band in some images
        stem = f"{i:06d}"
        cv2.imwrite(str(root / "images" / subset / f"{stem}.png"), img)
        cv2.imwrite(str(root / "annotations" / subset / f"{stem}.png"), mask)
        if regions:
            cv2.imwrite(str(root / "regions" / subset / f"{stem}.png"), reg * np.uint8(region_scale))
    return root


# ----------------------------------------------------------------------------- reader

def test_region_labels_are_read_as_0_1_beside_the_masks(tmp_path):
    root = neu_region_folder(tmp_path / "neu", region_scale=1)
    ds = open_dataset("neu-seg", root)
    assert ds.has_regions and len(ds) == 6
    for i in range(len(ds)):
        s = ds.load(i)
        k = int(s.entry.stem)
        assert s.region.dtype == np.uint8 and s.region.shape == s.mask.shape
        np.testing.assert_array_equal(s.region, region_of(k, 40, 56))
        assert s.entry.region == root / "regions" / "training" / f"{s.entry.stem}.png"
    # a subset keeps them
    sub = ds.filter(lambda e: e.stem != "000000")
    assert sub.has_regions and sub.load(0).region is not None


def test_any_nonzero_grey_and_a_colour_png_are_region(tmp_path):
    root = neu_region_folder(tmp_path / "neu", n=2)
    # a 3-channel label with an odd nonzero value: read as grey, nonzero is region
    reg = region_of(1, 40, 56)
    colour = np.zeros((40, 56, 3), np.uint8)
    colour[reg > 0] = (0, 0, 77)  # red in BGR: grey 23
    cv2.imwrite(str(root / "regions" / "training" / "000001.png"), colour)
    ds = open_dataset("neu-seg", root)
    s = ds.load([e.stem for e in ds.entries].index("000001"))
    np.testing.assert_array_equal(s.region, reg)


def test_16_bit_labels_keep_their_values_and_large_ones_are_refused(tmp_path):
    """16-bit PNG labels: read as grey, OpenCV would divide them by 256 and a 0/1 region (or a
    class-index mask) would become all zeros without a word."""
    root = neu_region_folder(tmp_path / "neu", n=2)
    reg = region_of(1, 40, 56)
    cv2.imwrite(str(root / "regions" / "training" / "000001.png"), reg.astype(np.uint16))
    mask = np.zeros((40, 56), np.uint16)
    mask[5:12, 20:30] = 2
    cv2.imwrite(str(root / "annotations" / "training" / "000001.png"), mask)
    ds = open_dataset("neu-seg", root)
    s = ds.load([e.stem for e in ds.entries].index("000001"))
    np.testing.assert_array_equal(s.region, reg)
    np.testing.assert_array_equal(s.mask, mask.astype(np.uint8))
    big = (reg.astype(np.uint16) * 1000)
    cv2.imwrite(str(root / "regions" / "training" / "000001.png"), big)
    with pytest.raises(ValueError, match=r"000001\.png: uint16 label with values up to 1000"):
        ds.load([e.stem for e in ds.entries].index("000001"))


def test_without_regions_folder_nothing_has_a_region(tmp_path):
    root = neu_region_folder(tmp_path / "neu", regions=False)
    ds = open_dataset("neu-seg", root)
    assert not ds.has_regions and all(e.region is None for e in ds.entries)
    assert ds.load(0).region is None


def test_other_layouts_have_no_regions(tmp_path):
    mt = tmp_path / "mt" / "MT_Crack" / "Imgs"
    mt.mkdir(parents=True)
    cv2.imwrite(str(mt / "exp1_num_1.jpg"), np.full((16, 16), 100, np.uint8))
    cv2.imwrite(str(mt / "exp1_num_1.png"), np.zeros((16, 16), np.uint8))
    # a regions/ folder means nothing to these layouts
    (tmp_path / "mt" / "regions").mkdir()
    fold = tmp_path / "folder"
    fold.mkdir()
    cv2.imwrite(str(fold / "a.png"), np.full((16, 16), 100, np.uint8))
    for ds in (open_dataset("magnetic-tile", tmp_path / "mt"), open_dataset("folder", fold)):
        assert not ds.has_regions and ds.load(0).region is None


def test_missing_region_label_is_an_error_naming_the_file(tmp_path):
    root = neu_region_folder(tmp_path / "neu")
    missing = root / "regions" / "training" / "000003.png"
    missing.unlink()
    with pytest.raises(ValueError, match=rf"^{missing}: missing: the region label of .*000003\.png"):
        open_dataset("neu-seg", root)
    # a split without that image opens: only the images read need their region labels
    from inspector.evaluation.datasets import split_of
    for split in (s for s in ("train", "val", "test") if split_of("000003") != s):
        ds = open_dataset("neu-seg", root, split=split)
        assert all(e.region is not None for e in ds.entries)


def test_unreadable_region_label_is_an_error_naming_the_file(tmp_path):
    root = neu_region_folder(tmp_path / "neu")
    bad = root / "regions" / "training" / "000002.png"
    bad.write_bytes(b"not a png")
    ds = open_dataset("neu-seg", root)
    i = [e.stem for e in ds.entries].index("000002")
    with pytest.raises(ValueError, match=rf"^{bad}: cannot read the region label of 000002\.png "
                                         r"\(unreadable"):
        ds.load(i)
    # deleted after opening: still names it
    bad.unlink()
    with pytest.raises(ValueError, match=rf"^{bad}: cannot read the region label .*\(missing\)"):
        ds.load(i)


def test_region_label_of_another_size_is_an_error_naming_the_file(tmp_path):
    root = neu_region_folder(tmp_path / "neu")
    bad = root / "regions" / "training" / "000004.png"
    cv2.imwrite(str(bad), np.zeros((40, 50), np.uint8))
    ds = open_dataset("neu-seg", root)
    with pytest.raises(ValueError, match=rf"^{bad}: region label is 50x40 but its image 000004\.png is 56x40"):
        ds.load([e.stem for e in ds.entries].index("000004"))


def test_the_official_test_subset_reads_its_own_regions(tmp_path):
    root = neu_region_folder(tmp_path / "neu", n=4)
    neu_region_folder(root, n=3, subset="test", first=100)
    test = open_dataset("neu-seg", root, split="test")
    assert test.has_regions and {e.region.parent.name for e in test.entries} == {"test"}
    # regions/ exists, so the test subset's images need theirs too
    (root / "regions" / "test" / "000101.png").unlink()
    with pytest.raises(ValueError, match="regions/test/000101.png: missing"):
        open_dataset("neu-seg", root, split="test")


# ----------------------------------------------------------------------------- training data

def test_dataset_frames_carry_the_region_and_resize_it_nearest(tmp_path):
    pytest.importorskip("torch")
    from export.arcd.data import DatasetFrames

    root = neu_region_folder(tmp_path / "neu")
    ds = open_dataset("neu-seg", root)
    frames = DatasetFrames(ds)
    assert frames.has_regions
    f = frames.frame(0)
    np.testing.assert_array_equal(f.region, region_of(int(ds.entries[0].stem), 40, 56))
    small = DatasetFrames(ds, frame_size=(20, 28)).frame(0)
    assert small.region.shape == (20, 28) and set(np.unique(small.region)) <= {0, 1}
    np.testing.assert_array_equal(small.region, cv2.resize(f.region, (28, 20), interpolation=cv2.INTER_NEAREST))
    assert not DatasetFrames(open_dataset("neu-seg", neu_region_folder(tmp_path / "plain", regions=False))
                             ).has_regions


def test_cut_tile_pads_the_region_with_ignore(tmp_path):
    pytest.importorskip("torch")
    from export.arcd.data import LabeledFrame, cut_tile

    reg = region_of(1, 40, 56)
    img = np.where(reg > 0, REGION_GREY, OTHER_GREY).astype(np.uint8)
    frame = LabeledFrame(image=img, truth=np.zeros_like(reg), region=reg)
    t = cut_tile(frame, (64, 64), np.random.default_rng(0))
    assert t.region.shape == (64, 64)
    np.testing.assert_array_equal(t.region[:40, :56], reg)
    assert (t.region[40:] == 255).all() and (t.region[:, 56:] == 255).all()
    # a crop inside the frame: the region's crop is the image's
    t = cut_tile(frame, (16, 16), np.random.default_rng(3))
    np.testing.assert_array_equal(t.region, (t.image == REGION_GREY).astype(np.uint8))


@pytest.mark.parametrize("tile", [(32, 32), (48, 64)], ids=["inside", "padded"])
def test_stage2_item_region_matches_its_image_tile_after_crop_and_flip(tmp_path, tile):
    torch = pytest.importorskip("torch")
    from export.arcd.data import DatasetFrames, SegmentationTileDataset, collate

    root = neu_region_folder(tmp_path / "neu")
    frames = DatasetFrames(open_dataset("neu-seg", root))
    ds = SegmentationTileDataset(frames, tile, length=24, seed=5, focus_prob=0.5, hflip=True,
                                 vflip=True)
    assert ds.has_regions
    flipped = set()
    for i in range(len(ds)):
        item = ds[i]
        reg, mask, img = item["region"], item["mask"], item["image"][0].numpy()
        assert reg.dtype == torch.int64 and tuple(reg.shape) == tile
        r = reg.numpy()
        labelled = r != 255
        assert set(np.unique(r[labelled])) <= {0, 1}
        # ignored exactly where the class mask is (padding), and the region follows the image
        np.testing.assert_array_equal(~labelled, mask.numpy() == 255)
        expect = (img > (REGION_GREY + OTHER_GREY) / 2 / 255).astype(np.int64)
        np.testing.assert_array_equal(r[labelled], expect[labelled])
        if tile == (32, 32):
            assert labelled.all()
        else:
            # a 40x56 frame in a 48x64 tile: the padding lies right / below, left / above after
            # a flip; it moved with the image (checked above), so record where it went
            flipped.add(("h", bool((~labelled[:, 0]).all())))
            flipped.add(("v", bool((~labelled[0]).all())))
    if tile != (32, 32):
        assert flipped == {("h", True), ("h", False), ("v", True), ("v", False)}
    batch = collate([ds[0], ds[1], ds[2]])
    assert tuple(batch["region"].shape) == (3, *tile) and batch["region"].dtype == torch.int64


def test_frames_without_regions_give_items_without_the_key(tmp_path):
    pytest.importorskip("torch")
    from export.arcd.data import DatasetFrames, SegmentationTileDataset, SyntheticDefectDataset

    plain = DatasetFrames(open_dataset("neu-seg", neu_region_folder(tmp_path / "neu", regions=False)))
    item = SegmentationTileDataset(plain, (32, 32), length=2)[0]
    assert set(item) == {"image", "mask"}
    assert "region" not in SyntheticDefectDataset(tile=(32, 32), length=1, frame_size=(32, 64))[0]


def test_stage1_ignores_regions(tmp_path):
    pytest.importorskip("torch")
    from export.arcd.data import DatasetFrames, DefectFreePatches, SimulatedAnomalyDataset
    from export.arcd.simulation import AnomalySimulator, SimulationConfig

    frames = DatasetFrames(open_dataset("neu-seg", neu_region_folder(tmp_path / "neu")))
    s1 = SimulatedAnomalyDataset(DefectFreePatches(frames, 16), (16, 16),
                                 AnomalySimulator(SimulationConfig(clean_prob=0.0)), length=2)
    assert set(s1[0]) == {"image", "target", "anomaly_mask"}


def test_mixed_frames_ignore_the_region_of_frames_without_labels(tmp_path):
    pytest.importorskip("torch")
    from export.arcd.data import DatasetFrames, MixedFrames, SegmentationTileDataset

    real = DatasetFrames(open_dataset("neu-seg", neu_region_folder(tmp_path / "real")))
    gen = DatasetFrames(open_dataset("neu-seg", neu_region_folder(tmp_path / "gen", regions=False)))
    mixed = MixedFrames(real, gen, 0.5)
    assert mixed.has_regions
    ds = SegmentationTileDataset(mixed, (32, 32), length=16, seed=1)
    kinds = set()
    for i in range(len(ds)):
        r = ds[i]["region"].numpy()
        kinds.add("ignored" if (r == 255).all() else "labelled")
    assert kinds == {"ignored", "labelled"}


def _build(root: Path):
    from export.arcd.data import FolderDataConfig, build_data
    from export.arcd.simulation import SimulationConfig

    cfg = FolderDataConfig(source="neu-seg", root=str(root), train_splits=["train", "test"],
                           calib_images=2, normal_patch=16, train_crop=(32, 32))
    return build_data(cfg, tile=(32, 32), channels=1, mean=[0.0], std=[1.0],
                      simulation=SimulationConfig(clean_prob=0.0), stage1_length=2,
                      stage2_length=2, seed=0)


def test_training_data_says_whether_stage2_has_regions(tmp_path):
    pytest.importorskip("torch")
    from export.arcd.data import TrainingDataError

    data = _build(neu_region_folder(tmp_path / "neu", n=20))
    assert data.has_regions and "region" in data.stage2[0]
    data.check()
    assert all(f.region is not None for f in data.val())
    assert not _build(neu_region_folder(tmp_path / "plain", n=20, regions=False)).has_regions
    # a missing region label is a training-data error naming the file and data.root (one line
    # from the trainer), an unreadable one is found by the up-front check
    root = neu_region_folder(tmp_path / "bad", n=20)
    gone = root / "regions" / "training" / "000007.png"
    gone.unlink()
    with pytest.raises(TrainingDataError, match=rf"^{gone}: missing") as err:
        _build(root)
    assert err.value.key == "data.root"
    cv2.imwrite(str(gone), np.zeros((3, 3), np.uint8))
    with pytest.raises(TrainingDataError, match=rf"^{gone}: region label is 3x3") as err:
        _build(root).check()
    assert err.value.key == "data.root"

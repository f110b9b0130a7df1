"""The dual-threshold recipe (CLGAN spec §2), probability and score thresholds, and components."""

import numpy as np
import pytest

from inspector.postprocess import (Geometry, PostprocessConfig, Postprocessor, components,
                                   dual_threshold, threshold_probabilities, threshold_score)


def test_constant_residual_gives_empty_mask_not_whole_image():
    for r in (np.zeros((16, 16), np.float32), np.full((16, 16, 3), 7.0, np.float32)):
        assert dual_threshold(r).sum() == 0


def test_two_d_residual_hand_computed():
    # 4 of 100 pixels at 5: mean 0.2, std sqrt(0.96) = 0.98, T1 = 3.14 -> the 4 fire;
    # grey image: mean 0.04, std 0.196, T2 = 0.236 -> the same 4; closing keeps a 2x2 square.
    r = np.zeros((10, 10), np.float32)
    r[3:5, 6:8] = 5.0
    m = dual_threshold(r, k1=3.0, k2=1.0, kernel_size=3)
    assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
    expected = np.zeros((10, 10), np.uint8)
    expected[3:5, 6:8] = 1
    np.testing.assert_array_equal(m, expected)


def test_k1_decides_which_pixels_pass_the_first_threshold():
    # values 1 (50 px) and 0 (50 px): mean .5, std .5; T1(k1=0.9) = .95 -> the 1s pass,
    # T1(k1=1.1) = 1.05 -> none pass, and the empty vote image gives an empty mask.
    r = np.zeros((10, 10), np.float32)
    r[:5] = 1.0
    assert dual_threshold(r, k1=0.9, kernel_size=0).sum() == 50
    assert dual_threshold(r, k1=1.1, kernel_size=0).sum() == 0


def test_rgb_square_recovered_and_noise_removed():
    rng = np.random.default_rng(0)
    r = np.abs(rng.normal(0, 1, (128, 128, 3))).astype(np.float32)
    r[40:60, 70:90] += 12.0
    m = dual_threshold(r)
    inside = m[40:60, 70:90].mean()
    outside = np.delete(m.reshape(-1), np.ravel_multi_index(np.mgrid[40:60, 70:90].reshape(2, -1),
                                                               (128, 128))).mean()
    assert inside > 0.99
    assert outside < 0.01


def test_scaling_the_residual_changes_nothing():
    rng = np.random.default_rng(1)
    r = np.abs(rng.normal(0, 1, (64, 64, 3))).astype(np.float32)
    r[10:20, 10:20] += 6
    np.testing.assert_array_equal(dual_threshold(r), dual_threshold(r * 10))


def test_closing_fills_one_pixel_hole():
    r = np.zeros((32, 32), np.float32)
    r[10:20, 10:20] = 9.0
    r[15, 15] = 0.0
    m = dual_threshold(r, kernel_size=3)
    assert m[15, 15] == 1
    assert dual_threshold(r, kernel_size=0)[15, 15] == 0


def test_blue_only_defect_kept_when_area_small():
    # spec §2.4: with few flagged pixels the grey vote threshold is below 0.114, so B alone passes
    rng = np.random.default_rng(2)
    r = np.abs(rng.normal(0, 0.1, (100, 100, 3))).astype(np.float32)
    r[50:53, 50:53, 2] += 10.0
    m = dual_threshold(r)
    assert m[50:53, 50:53].all()


def test_defect_touching_border_survives_closing():
    r = np.zeros((20, 20), np.float32)
    r[0:3, 0:5] = 4.0
    assert dual_threshold(r)[0:3, 0:5].all()


def test_bad_residual_shape_is_rejected():
    with pytest.raises(ValueError, match="HxW or HxWx3"):
        dual_threshold(np.zeros((4, 4, 2)))


def test_probability_threshold_per_class_and_morphology():
    p = np.zeros((3, 8, 8), np.float32)
    p[0] = 1.0
    p[:, 1:3, 1:3] = np.array([0.2, 0.7, 0.1])[:, None, None]
    p[:, 5:7, 5:7] = np.array([0.4, 0.25, 0.35])[:, None, None]
    lab = threshold_probabilities(p, np.array([0.5, 0.3]))
    assert (lab[1:3, 1:3] == 1).all()
    assert (lab[5:7, 5:7] == 2).all()
    assert lab.sum() == 4 * 1 + 4 * 2
    # raising class 2's threshold removes it; opening with 3x3 removes the 2x2 blob too
    assert (threshold_probabilities(p, np.array([0.5, 0.5]))[5:7, 5:7] == 0).all()
    assert threshold_probabilities(p, np.array([0.5, 0.3]), open_kernel=3).sum() == 0


def _labels_by_definition(probs, thr):
    """A pixel's label straight from the rule: the most probable class above its threshold."""
    above = probs[1:] >= thr[:, None, None]
    best = np.where(above, probs[1:], -1.0).argmax(axis=0)
    return np.where(above.any(axis=0), best + 1, 0).astype(np.uint8)


@pytest.mark.parametrize("background_bias,most_are_candidates", [(6.0, False), (0.0, True)])
def test_probability_threshold_matches_the_rule_on_noisy_maps_and_ties(background_bias, most_are_candidates):
    rng = np.random.default_rng(int(background_bias))
    thr = np.array([0.3, 0.25, 0.35], np.float32)
    for rounded in (False, True):  # integer logits make exact ties between classes
        logits = rng.normal(scale=2.0, size=(4, 64, 200)).astype(np.float32)
        logits[0] += background_bias
        if rounded:
            logits = np.round(logits)
        p = np.exp(logits)
        p /= p.sum(0, keepdims=True)
        # both ways through the function: gathering candidates, or every pixel once most are
        assert (np.mean(1.0 - p[0] >= thr.min()) > 0.25) == most_are_candidates
        got = threshold_probabilities(p, thr, score_map=1.0 - p[0])
        assert np.array_equal(got, _labels_by_definition(p, thr))


def test_components_of_a_noisy_mask_largest_first_ties_in_label_order():
    import cv2

    lab = (np.random.default_rng(3).random((64, 256)) < 0.15).astype(np.uint8)
    lab[40:50, 10:30] = 2                       # one big blob among thousands of specks
    lab[0, 0] = lab[-1, -1] = 1                 # the marked box is the whole mask
    score = np.ones(lab.shape, np.float32)
    n, _, stats, _ = cv2.connectedComponentsWithStats((lab > 0).astype(np.uint8), connectivity=8)
    for min_area, cap in ((0, 50), (3, 40), (0, 10**6)):
        # the order by definition: area descending, equal areas in OpenCV's label order
        want = sorted((i for i in range(1, n) if stats[i, 4] >= max(min_area, 1)),
                      key=lambda i: -stats[i, 4])
        d, total = components(lab, score, ["bg", "a", "b"], min_area_px=min_area, max_defects=cap)
        assert total == len(want) > 100
        assert [x["bbox"] for x in d] == [[int(v) for v in stats[i, :4]] for i in want[:cap]]
    assert d[0]["class"] == "b" and d[0]["area_px"] >= 200


def _components_by_definition(lab, score, names, geometry, strip_pos_mm):
    """Every field from OpenCV's own statistics, one component at a time."""
    import cv2

    n, cc, stats, cents = cv2.connectedComponentsWithStats((lab > 0).astype(np.uint8), connectivity=8)
    out = []
    for i in sorted(range(1, n), key=lambda i: -stats[i, 4]):
        inside = cc == i
        cls = int(np.bincount(lab[inside]).argmax())  # ties: the lower class
        cy = float(cents[i][1])
        out.append({"class": names[cls], "class_id": cls, "score": round(float(score[inside].max()), 4),
                    "bbox": [int(v) for v in stats[i, :4]], "area_px": int(stats[i, 4]),
                    "centroid": [round(float(cents[i][0]), 1), round(cy, 1)],
                    "area_mm2": round(int(stats[i, 4]) * geometry.mm_per_px_across * geometry.mm_per_px_along, 2),
                    "strip_pos_mm": round(strip_pos_mm + cy * geometry.mm_per_px_along, 1)})
    return out


def test_components_match_opencv_statistics_field_by_field():
    # classes mixed inside components (majority and ties), scores and centroids everywhere
    rng = np.random.default_rng(11)
    names = ["background", "a", "b", "c"]
    geo = Geometry(0.37, 0.53)
    for _ in range(20):
        lab = np.zeros((int(rng.integers(8, 120)), int(rng.integers(8, 300))), np.uint8)
        for _ in range(int(rng.integers(1, 40))):
            y, x = rng.integers(0, lab.shape[0]), rng.integers(0, lab.shape[1])
            lab[y:y + rng.integers(1, 12), x:x + rng.integers(1, 15)] = rng.integers(1, 4)
        score = rng.random(lab.shape, dtype=np.float32)
        got, total = components(lab, score, names, max_defects=10**6, geometry=geo, strip_pos_mm=321.5)
        want = _components_by_definition(lab, score, names, geo, 321.5)
        assert total == len(want) and got == want


def test_components_fields_and_geometry():
    lab = np.zeros((20, 30), np.uint8)
    lab[2:5, 3:9] = 3          # 18 px of class 3
    lab[10:12, 20:21] = 1      # 2 px of class 1
    score = np.zeros((20, 30), np.float32)
    score[2:5, 3:9] = 0.9
    score[10:12, 20:21] = 0.6
    names = ["background", "inclusion", "patches", "scratches"]
    d, total = components(lab, score, names, geometry=Geometry(2.0, 0.5), strip_pos_mm=1000.0)
    assert total == 2
    assert d[0]["class"] == "scratches" and d[0]["area_px"] == 18 and d[0]["bbox"] == [3, 2, 6, 3]
    assert d[0]["score"] == pytest.approx(0.9)
    assert d[0]["area_mm2"] == pytest.approx(18.0)
    assert d[0]["strip_pos_mm"] == pytest.approx(1000.0 + 3.0 * 0.5)
    assert d[1]["class"] == "inclusion"
    d, total = components(lab, score, names, min_area_px=5)
    assert total == 1 and len(d) == 1
    d, total = components(lab, score, names, max_defects=1)
    assert total == 2 and len(d) == 1


def test_postprocessor_rejects_unknown_class_threshold():
    with pytest.raises(ValueError, match="unknown class"):
        Postprocessor(PostprocessConfig(class_thresholds={"rust": 0.4}), ["background", "scratches"])


def test_score_threshold_hand_computed_any_sign():
    s = np.full((8, 10), -0.3, np.float32)
    s[1:3, 1:4] = 0.5
    s[6, 8] = 0.2
    m = threshold_score(s, 0.2)
    assert m.dtype == np.uint8 and m.shape == (8, 10)
    assert m.sum() == 7 and m[6, 8] == 1  # ">=": a score equal to the threshold is a defect
    assert threshold_score(s, 0.21).sum() == 6
    assert threshold_score(s, -0.3).sum() == 80  # negative thresholds are allowed
    assert threshold_score(s, 0.6).sum() == 0
    with pytest.raises(ValueError, match="HxW"):
        threshold_score(np.zeros((2, 4, 4), np.float32), 0.1)


def test_score_threshold_morphology_and_min_area_through_the_postprocessor():
    s = np.zeros((12, 12), np.float32)
    s[2:6, 2:6] = 1.0
    s[3, 3] = 0.0            # a one-pixel hole
    s[10, 10] = 1.0          # a lone pixel
    names = ["background", "defect"]
    post = Postprocessor(PostprocessConfig(type="score_threshold", score_threshold=0.5), names)
    lab = post.mask(None, None, s)
    assert lab.sum() == 15 + 1
    cfg = PostprocessConfig(type="score_threshold", score_threshold=0.5, close_kernel=3)
    post = Postprocessor(cfg, names)
    assert post.mask(None, None, s)[3, 3] == 1  # closing fills the hole
    solid = np.zeros((12, 12), np.float32)
    solid[2:7, 2:7] = 1.0
    solid[10, 10] = 1.0
    post = Postprocessor(PostprocessConfig(type="score_threshold", score_threshold=0.5, open_kernel=3), names)
    lab = post.mask(None, None, solid)
    assert lab[10, 10] == 0 and lab[2:7, 2:7].all() and lab.sum() == 25  # opening drops the lone pixel
    post = Postprocessor(PostprocessConfig(type="score_threshold", score_threshold=0.5, min_area_px=4), names)
    lab = post.mask(None, s, s)
    defects, total = post.defects(lab, s)
    assert total == 1 and defects[0]["class"] == "defect" and defects[0]["area_px"] == 15
    assert defects[0]["score"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="score map"):
        post.mask(None, s, None)

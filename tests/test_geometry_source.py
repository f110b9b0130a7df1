"""Which pixel size areas and positions use when both the config's `geometry` and the source give
one: the source's, as documented, but said (it used to be silent: `area_mm2` 1.3x the config's)."""

from __future__ import annotations

import json

from conftest import run_cli, write_config


def test_check_shows_the_geometry_in_use_and_warns_of_an_overridden_value(tmp_path, synthetic_cfg):
    # synthetic strip: 1600 mm over 512 px across, 60 m/min at 5 fps over 128 rows along
    raw = synthetic_cfg(geometry={"mm_per_px_across": 1.0, "mm_per_px_along": 1.0})
    raw["source"].update(fps=5, strip_width_mm=512)
    r = run_cli("check", "--config", str(write_config(tmp_path / "cam.yaml", raw)), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["geometry"] == "1 x 1.562 mm/px (across x along; across and along from the source)"
    along = [w for w in out["warnings"] if "geometry.mm_per_px_along: 1 in the config, but the source "
                                           "gives 1.5625 with its frames, which is used" in w]
    assert len(along) == 1 and not any("mm_per_px_across" in w for w in out["warnings"])  # equal: no word


def test_the_pipeline_warns_once_and_measures_with_the_source(synthetic_cfg, caplog):
    from inspector.config import InspectorConfig
    from inspector.pipeline import Pipeline

    raw = synthetic_cfg(geometry={"mm_per_px_across": 1.0, "mm_per_px_along": 1.0})
    raw["source"].update(fps=0, defect_rate=1.0, strip_width_mm=1024)
    cfg = InspectorConfig.model_validate(raw)
    got = []
    with caplog.at_level("WARNING", logger="inspector.pipeline"):
        with Pipeline(cfg, on_report=got.append) as p:
            p.run(frames=4)
    warned = [r.getMessage() for r in caplog.records if "geometry.mm_per_px_across: 1 in the config" in r.getMessage()]
    assert len(warned) == 1, warned
    # the source's 1024 mm over 512 px, and (fps 0) as long along: 2 x 2 mm per pixel
    defects = [d for header in got for d in header["defects"]]
    assert defects and all(abs(d["area_mm2"] - 4.0 * d["area_px"]) < 1e-6 for d in defects), defects[:3]


def test_only_a_value_both_give_and_that_differs_is_an_override():
    from inspector.postprocess import Geometry

    assert Geometry(1.0, 1.0).overridden_by({"mm_per_px_across": 1.0}) == []
    assert Geometry().overridden_by({"mm_per_px_across": 2.0}) == []  # nothing set: nothing overridden
    assert Geometry(1.0, None).for_frame({"mm_per_px_along": 0.5}).mm_per_px_along == 0.5

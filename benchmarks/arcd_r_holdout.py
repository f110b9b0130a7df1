"""How well a trained ARCD run's reconstruction network R reconstructs, in the thesis's terms.

Draws ``--samples`` stage-1 windows past the run's training range (the same simulation, never
trained on) and scores R's reconstruction of them with ``export.arcd.train.reconstruction_holdout``:
MSE, SSIM and the thesis's RA (eq. 4-9) over all windows, over the windows the simulation left
clean, over those with an anomaly, and for copying the input on the latter (``beats_copy``: is R
better than doing nothing there). The trainer logs the same for 64 windows at the end of stage 1;
this script scores more of them, or a run trained before that was logged. Needs the training
extra (torch) and the run folder's ``config.yaml`` and ``checkpoint.pt``.

    python benchmarks/arcd_r_holdout.py runs/arcd-neu-d12 --samples 400 \
        [--data-root ../shared/data/neu_seg] [--out bench-out/r-holdout.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from inspector.argtypes import positive_int  # noqa: E402
from inspector.errors import InspectorError  # noqa: E402

log = logging.getLogger("arcd_r_holdout")


def r_holdout(run_dir: Path, samples: int, data_root: Path | None = None, threads: int = 2) -> dict:
    """Score ``run_dir``'s R on ``samples`` held-out stage-1 windows (see the module text)."""
    import torch

    from export.arcd.train import build_models, load_checkpoint, load_config, stage1_holdout, training_data

    cfg = load_config(run_dir / "config.yaml")
    if not cfg.model.reconstruction:
        raise InspectorError(f"{run_dir}: a plain baseline run (model.reconstruction: false) has no R to score")
    if data_root is not None:
        if not hasattr(cfg.data, "root"):
            raise InspectorError(f"--data-root {data_root}: {run_dir} trained on {cfg.data.source} frames, "
                                 "which have no data folder")
        cfg.data.root = data_root
    torch.set_num_threads(threads)
    r, _ = build_models(cfg.model)
    r.load_state_dict(load_checkpoint(run_dir / "checkpoint.pt")["reconstruction"])
    # the same windows the trainer's own hold-out starts with (single process)
    res = stage1_holdout(cfg, r, training_data(cfg), samples)
    return {"run": str(run_dir), "stage1_steps": cfg.stage1.steps, "r_base_width": cfg.model.r_base_width,
            "data": str(getattr(cfg.data, "root", cfg.data.source)), **res}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="an ARCD run folder (config.yaml + checkpoint.pt)")
    ap.add_argument("--samples", type=positive_int, default=400, help="held-out windows to score")
    ap.add_argument("--data-root", type=Path, help="the data folder, where the run's config names another")
    ap.add_argument("--threads", type=positive_int, default=2, help="torch threads")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        res = r_holdout(args.run_dir, args.samples, args.data_root, args.threads)
    except ImportError as e:
        log.error("%s: this script needs the training extra (pip install -e '.[train]')", e)
        return 2
    except (InspectorError, OSError, ValueError) as e:  # bad config, missing/damaged checkpoint, data
        log.error("%s", e)
        return 2
    for kind in ("clean", "anomalous", "copy_input"):
        part = res[kind]
        if part is not None:
            log.info("%-10s windows %4d  mse %.5f  ssim %.4f  RA %.3g  loss %.5f", kind, part["samples"],
                     part["mse"], part["ssim"], part["ra"], part["loss"])
    log.info("all        windows %4d  mse %.5f  ssim %.4f  RA %.3g; R beats copying the input: %s",
             res["samples"], res["mse"], res["ssim"], res["ra"], res["beats_copy"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

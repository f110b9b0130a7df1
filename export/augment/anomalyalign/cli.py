"""``inspector augment anomalyalign train | sample``.

Only argparse at import time: :func:`add_commands` runs while the ``inspector`` parser is built
(the runtime must start without torch or diffusers); each command imports the trainer or the
sampler when it runs. Bad input raises ValueError / FileNotFoundError / FileExistsError /
ConfigError naming the argument or file; ``inspector augment`` turns them into exit code 2.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from export.augment.cli_common import add_train_command, seed_value, stoppable_sample
from inspector.argtypes import positive_int

__all__ = ["add_commands"]


def guidance_scale(text: str) -> float:
    """``--guidance``: a number >= 1 (1 = no classifier-free guidance). Below 1 it would sample
    as 1 while the manifest recorded the value given."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be >= 1 (1 = no classifier-free guidance), got {text}")
    if not math.isfinite(value):  # inf sampled NaN pixels, written as all-black images, exit 0
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def cmd_sample(args: argparse.Namespace) -> int:
    from export.augment.anomalyalign.sample import sample, write_grid
    from export.augment.cli_common import check_sample_paths

    check_sample_paths(args.out, args.grid)
    path = sample(Path(args.run_dir), Path(args.out), args.n, args.seed, steps=args.steps,
                  guidance=args.guidance, batch_size=args.batch_size, threads=args.threads,
                  data_root=args.data_root)
    if args.grid:
        write_grid(Path(args.out), Path(args.grid))
    print(path)
    return 0


def add_commands(gsub: argparse._SubParsersAction) -> None:
    """Register ``anomalyalign`` under ``inspector augment``."""
    p = gsub.add_parser("anomalyalign", help="AnomalyAlign: mask- and prompt-conditioned diffusion "
                                             "(ControlNet form) that draws whole defect images (spec 000)")
    sub = p.add_subparsers(dest="action", required=True)

    add_train_command(sub, "anomalyalign", "diffusion iterations")

    q = sub.add_parser("sample", help="DDIM from the subset's real masks (flipped/shifted) and their "
                                      "prompts; write NEU-Seg pairs + manifest")
    q.add_argument("--run-dir", required=True, help="trained run folder (checkpoint.pt)")
    q.add_argument("--out", required=True, help="output folder (new, or empty; written whole at the end)")
    q.add_argument("--n", type=positive_int, required=True, help="pairs to write")
    q.add_argument("--seed", type=seed_value, default=0, help="everything random derives from it "
                                                                "(0..2**32-1)")
    q.add_argument("--steps", type=positive_int, help="DDIM steps (default: the run's sample.steps)")
    q.add_argument("--guidance", type=guidance_scale, help="classifier-free guidance scale, >= 1 "
                                                           "(default: the run's sample.guidance_scale; 1 = off)")
    q.add_argument("--batch-size", type=positive_int, help="images per DDIM batch")
    q.add_argument("--threads", type=positive_int, help="torch threads (default: the run's threads)")
    q.add_argument("--grid", help="also write a PNG grid of the first 16 pairs with their masks")
    q.add_argument("--data-root", help="NEU-Seg folder the run was trained on (default: the run's "
                                       "data.root; relative: from the folder it was trained in, "
                                       "then from here)")
    q.set_defaults(augment_fn=stoppable_sample(cmd_sample))

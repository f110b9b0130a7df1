"""``inspector augment defectgan train | sample``.

Only argparse at import time: :func:`add_commands` is called while the ``inspector`` parser is
built (the runtime must start without torch); each command imports the trainer or the sampler
when it runs. Bad input raises ValueError / FileNotFoundError / FileExistsError / ConfigError
whose message names the argument or file; ``inspector augment`` turns them into exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from export.augment.cli_common import add_train_command, seed_value, stoppable_sample
from inspector.argtypes import positive_int

__all__ = ["add_commands"]


def cmd_sample(args: argparse.Namespace) -> int:
    from export.augment.cli_common import check_sample_paths
    from export.augment.defectgan.sample import sample

    check_sample_paths(args.out, args.grid)
    path = sample(Path(args.run_dir), Path(args.out), args.n, args.seed, classes=args.classes,
                  threshold=args.threshold, defects_per_image=args.defects_per_image,
                  threads=args.threads, grid=Path(args.grid) if args.grid else None,
                  min_defect_px=args.min_defect_px)
    print(path)
    return 0


def add_commands(gsub: argparse._SubParsersAction) -> None:
    """Register ``defectgan`` under ``inspector augment``."""
    p = gsub.add_parser("defectgan", help="Defect-GAN: defacement/restoration GAN that pastes "
                                          "synthetic defects onto real images (spec 003)")
    sub = p.add_subparsers(dest="action", required=True)

    add_train_command(sub, "defectgan", "critic iterations")

    q = sub.add_parser("sample", help="paste synthetic defects onto real subset images; write "
                                      "NEU-Seg pairs + manifest")
    q.add_argument("--run-dir", required=True, help="trained run folder (checkpoint.pt)")
    q.add_argument("--out", required=True, help="output folder (new, or empty; written whole at the end)")
    q.add_argument("--n", type=positive_int, required=True, help="pairs to write")
    q.add_argument("--seed", type=seed_value, default=0, help="everything random derives from it "
                                                                "(0..2**32-1)")
    q.add_argument("--classes", help="comma list of defect classes to synthesise, taken in turn "
                                     "(default: all, e.g. inclusion,patches,scratches)")
    q.add_argument("--threshold", type=float, help="distribution map -> mask (default: the run's "
                                                   "sample.threshold, 0.5)")
    q.add_argument("--min-defect-px", type=positive_int, help="smallest synthetic mask that is pasted "
                                                           "(default: the run's sample.min_defect_px, 20)")
    q.add_argument("--defects-per-image", type=positive_int, default=1, help="synthetic defects per image")
    q.add_argument("--threads", type=positive_int, default=1, help="torch threads (fixed for repeatability)")
    q.add_argument("--grid", help="also write a PNG grid of the first 16 pairs with their masks")
    q.set_defaults(augment_fn=stoppable_sample(cmd_sample))

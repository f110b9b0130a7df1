"""What the generators' ``inspector augment <generator> ...`` commands share (argparse only:
the ``inspector`` parser is built without torch)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from inspector.argtypes import positive_int

__all__ = ["add_train_command"]


def add_train_command(sub: argparse._SubParsersAction, kind: str, iterations: str) -> None:
    """``inspector augment <kind> train``: runs ``export.augment.<kind>.train.train`` (imported
    when the command runs) on ``--config``, printing the run folder."""

    def cmd_train(args: argparse.Namespace) -> int:
        if args.resume and not args.run_dir:  # it used to train a new run in runs/<name>-<time>
            raise ValueError("--resume needs --run-dir")
        train = importlib.import_module(f"export.augment.{kind}.train").train
        if not Path(args.config).is_file():
            raise FileNotFoundError(f"--config {args.config}: no such file")
        run_dir = train(Path(args.config), Path(args.run_dir) if args.run_dir else None,
                        args.resume, args.max_iters)
        print(run_dir)
        return 0

    q = sub.add_parser("train", help="train on the labelled NEU-Seg subset of the config")
    q.add_argument("--config", required=True, help=f"training YAML (kind: {kind})")
    q.add_argument("--run-dir", help="run folder (default: runs/<name>-<time>)")
    q.add_argument("--resume", action="store_true", help="continue from the checkpoint in --run-dir")
    q.add_argument("--max-iters", type=positive_int, help=f"stop after this many {iterations}")
    q.set_defaults(augment_fn=cmd_train)

"""What the generators' ``inspector augment <generator> ...`` commands share (argparse only:
the ``inspector`` parser is built without torch)."""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

from inspector.argtypes import positive_int

__all__ = ["add_train_command", "named_stop", "naming_stops", "stoppable_sample", "EXIT_STOPPED"]

T = TypeVar("T")

#: exit status of a command stopped by Ctrl-C or SIGTERM (``export.training.EXIT_INTERRUPTED``,
#: not imported: this module is read while the parser is built, without torch)
EXIT_STOPPED = 130


def named_stop(e: KeyboardInterrupt) -> KeyboardInterrupt:
    """``e``, or for the bare ``KeyboardInterrupt`` Python's own SIGINT handler raises (Ctrl-C
    outside a training step) one that names the signal, as the other stops do ("signal
    SIGTERM"): ``inspector``'s stop line printed it as ``stopped ()``."""
    return e if str(e) else KeyboardInterrupt("signal SIGINT")


def naming_stops(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` with a bare ``KeyboardInterrupt`` re-raised as :func:`named_stop` names it (the
    trainers, under ``inspector augment ... train`` and ``python -m``: the trainer has logged
    whether it saved a checkpoint)."""

    @functools.wraps(fn)
    def run(*args: Any, **kw: Any) -> T:
        try:
            return fn(*args, **kw)
        except KeyboardInterrupt as e:
            stop = named_stop(e)
            if stop is e:
                raise
            raise stop from None

    return run


def stoppable_sample(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``inspector augment <generator> sample`` stopped by Ctrl-C or SIGTERM: one line that says
    what is left (the pairs go to --out only when all are written) and exit 130, instead of
    ``inspector``'s line for trainers ("continue with --resume": sample has no --resume)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except KeyboardInterrupt as e:
            from export.augment.dataset import MANIFEST

            out = Path(args.out)
            if (out / MANIFEST).is_file():  # stopped after the pairs (writing the --grid picture)
                what = f"the pairs in {out} are complete ({MANIFEST})" + (
                    f"; the --grid {args.grid} was not written" if getattr(args, "grid", None) else "")
            else:
                what = (f"nothing was written to {out} (sample writes its pairs there only when "
                        "all are done); run sample again")
            print(f"inspector: error: stopped ({named_stop(e)}); {what}", file=sys.stderr)
            return EXIT_STOPPED

    return run


def add_train_command(sub: argparse._SubParsersAction, kind: str, iterations: str) -> None:
    """``inspector augment <kind> train``: runs ``export.augment.<kind>.train.train`` (imported
    when the command runs) on ``--config``, printing the run folder."""

    def cmd_train(args: argparse.Namespace) -> int:
        if args.resume and not args.run_dir:  # it used to train a new run in runs/<name>-<time>
            raise ValueError("--resume needs --run-dir")
        train = importlib.import_module(f"export.augment.{kind}.train").train
        if not Path(args.config).is_file():
            raise FileNotFoundError(f"--config {args.config}: no such file")
        run_dir = naming_stops(train)(Path(args.config), Path(args.run_dir) if args.run_dir else None,
                                      args.resume, args.max_iters)
        print(run_dir)
        return 0

    q = sub.add_parser("train", help="train on the labelled NEU-Seg subset of the config")
    q.add_argument("--config", required=True, help=f"training YAML (kind: {kind})")
    q.add_argument("--run-dir", help="run folder (default: runs/<name>-<time>)")
    q.add_argument("--resume", action="store_true", help="continue from the checkpoint in --run-dir")
    q.add_argument("--max-iters", type=positive_int, help=f"stop after this many {iterations}")
    q.set_defaults(augment_fn=cmd_train)

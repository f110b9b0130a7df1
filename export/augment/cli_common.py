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

__all__ = ["add_train_command", "named_stop", "naming_stops", "stoppable_sample", "EXIT_STOPPED",
           "GENERATORS", "not_this_generator", "check_run_dir", "unfinished_run"]

T = TypeVar("T")

#: exit status of a command stopped by Ctrl-C or SIGTERM (``export.training.EXIT_INTERRUPTED``,
#: not imported: this module is read while the parser is built, without torch)
EXIT_STOPPED = 130


#: the generators' checkpoint kinds and how their ``sample`` command and names read
GENERATORS = {"defectgan": "Defect-GAN", "anomalyalign": "AnomalyAlign"}


def check_run_dir(run_dir: Path) -> None:
    """``--run-dir`` of ``sample``: one message for both generators when it is not a folder."""
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"--run-dir {run_dir}: no such folder")


def _a(name: str) -> str:
    """``name`` with its article ("an AnomalyAlign", "a Defect-GAN")."""
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def not_this_generator(path: Path, ck: dict, want: str, fmt: int) -> str:
    """The message for a checkpoint that is not ``want``'s (of format ``fmt``): a run of the
    other generator names it and its command; a detector run (arcd, clgan, fuzzymask) says so."""
    kind = ck.get("kind")
    if kind in GENERATORS and kind != want:
        return (f"{path}: {_a(GENERATORS[kind])} run (kind {kind}), not {GENERATORS[want]}: sample "
                f"it with `inspector augment {kind} sample`")
    if kind is not None and kind != want:
        return f"{path}: a checkpoint of kind {kind}, not {_a(GENERATORS[want])} run"
    return f"{path}: not {_a(GENERATORS[want])} checkpoint of format {fmt}"


def unfinished_run(run_dir: Path, kind: str, step: int, total: int | None, what: str) -> bool:
    """Log a WARNING when ``sample`` reads a run whose training stopped before its planned
    ``total`` ``what`` (max_minutes, --max-iters, a stop): its pairs come from a generator that
    had not finished, and sampling it was silent. Returns whether training was complete (True
    when the checkpoint does not say how many were planned)."""
    import logging

    if total is None or step >= total:
        return True
    logging.getLogger(f"export.augment.{kind}.sample").warning(
        "%s: training stopped at %s %d of %d (max_minutes, --max-iters or a stop): these pairs "
        "come from an unfinished generator; finish it with `inspector augment %s train --config "
        "<its config> --run-dir %s --resume`", run_dir, what, step, total, kind, run_dir)
    return False


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
    q.add_argument("--max-iters", type=positive_int,
                   help=f"stop after this many {iterations} in this invocation (with --resume: "
                        "this many more, not a total)")
    q.set_defaults(augment_fn=cmd_train)

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
from inspector.fileio import missing_folder

__all__ = ["add_train_command", "named_stop", "naming_stops", "stoppable_sample", "EXIT_STOPPED",
           "GENERATORS", "not_this_generator", "check_run_dir", "unfinished_run", "seed_value",
           "check_sample_paths", "SEED_MAX", "writable_place"]

T = TypeVar("T")

#: exit status of a command stopped by Ctrl-C or SIGTERM (``export.training.EXIT_INTERRUPTED``,
#: not imported: this module is read while the parser is built, without torch)
EXIT_STOPPED = 130


#: the generators' checkpoint kinds and how their ``sample`` command and names read
GENERATORS = {"defectgan": "Defect-GAN", "anomalyalign": "AnomalyAlign"}


#: the largest ``--seed``: numpy's and torch's generators both take it (a negative seed, or one
#: past 2**64, failed deep inside them with their own words)
SEED_MAX = 2 ** 32 - 1


def seed_value(text: str) -> int:
    """``--seed``: a whole number 0..SEED_MAX."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be 0..{SEED_MAX}, got {text}")
    return value


seed_value.__name__ = "seed"


def writable_place(path: Path, option: str) -> None:
    """Refuse ``path`` (a file or folder still to be written) when the folder it would go in
    cannot take it: a parent that is a file, or a place nothing can be created in (``/proc``, a
    read-only or unwritable folder). Probed by making and removing a hidden folder in the
    nearest existing parent: nothing is left behind."""
    import errno
    import os
    import tempfile

    for parent in Path(path).parents:
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise ValueError(f"{option} {path}: {parent} is a file, not a folder")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=parent))
        except OSError as e:
            raise ValueError(f"{option} {path}: cannot write in {parent} "
                             f"({os.strerror(e.errno or errno.EIO)})") from None
        return


def check_sample_paths(out: str | Path, grid: str | Path | None) -> None:
    """``sample``'s ``--out`` and ``--grid``, before anything is sampled: a bad ``--grid`` was
    found after the pairs were written (exit 2, and the rerun refused the now full --out), and an
    --out under a file or in /proc failed with a bare errno on an internal temp-folder name."""
    from export.augment.dataset import check_output_folder

    check_output_folder(Path(out))
    writable_place(Path(out), "--out")
    if grid is None:
        return
    g = Path(grid)
    if g.is_dir():
        raise ValueError(f"--grid {grid}: is a folder; give a PNG file name (e.g. {g / 'grid.png'})")
    if g.suffix.lower() != ".png":
        raise ValueError(f"--grid {grid}: expected a .png file name (the grid is a PNG)")
    if g.absolute() == Path(out).absolute() or Path(out).absolute() in g.absolute().parents:
        raise ValueError(f"--grid {grid}: inside --out {out}, which must hold the pairs only")
    writable_place(g, "--grid")


def check_run_dir(run_dir: Path) -> None:
    """``--run-dir`` of ``sample``: one message for both generators when it is not a folder."""
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"--run-dir {run_dir}: {missing_folder(run_dir, 'run folder')}")


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

"""What the trainers of ``export.arcd``, ``export.clgan`` and ``export.fuzzymask`` share.

The run folder's file names, config validation with errors that name the file and the dotted
key, the run folder's creation, atomic checkpoints, torchrun process groups and device choice,
rate / ETA figures for the log, and the ``python -m export.<kind>.train`` command line. The
exporters use :func:`run_kind` (which trainer wrote a run) and :func:`git_commit` (provenance).

Everything here behaves as the per-trainer copies it replaces did: the same file names, log
lines and error messages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inspector.config import read_yaml_mapping
from inspector.errors import CheckpointError, ConfigError, first_line, validator_message
from inspector.signals import sigterm_as_interrupt  # noqa: F401  (re-exported for the trainers)
from inspector.fileio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["RunSettings", "CHECKPOINT", "CONFIG", "METRICS", "LOSSES", "PREVIEW", "validate_config",
           "read_config", "prepare_run_dir", "write_run_config", "atomic_save", "write_metrics", "read_checkpoint",
           "fmt_duration", "rate_eta", "update_ema", "Ranks", "init_distributed", "pick_device",
           "start_ranks", "check_device", "end_ranks", "USER_ERRORS", "EXIT_INTERRUPTED",
           "sigterm_as_interrupt", "whole_step", "TrainingStopped", "quiet_worker", "saved_config", "train_main", "step_generator", "check_resume_keys",
           "run_kind", "git_commit", "read_metrics", "metrics_for_checkpoint", "split_provenance",
           "trim_losses", "RESUME_NEEDS_RUN_DIR"]

# The run folder's files (``inspector export onnx`` and the tests find them by these names)
CHECKPOINT = "checkpoint.pt"
CONFIG = "config.yaml"
METRICS = "metrics.json"
LOSSES = "losses.jsonl"
PREVIEW = "preview.png"

M = TypeVar("M", bound=BaseModel)


# ---------------------------------------------------------------------------------------------
# Config and run folder
# ---------------------------------------------------------------------------------------------

class RunSettings(BaseModel):
    """The keys every trainer's YAML has at its top (a trainer redeclares one to change its
    default); ``extra="forbid"`` so a key a trainer does not read is an error, not ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    seed: int = 0
    threads: int = Field(2, ge=1, description="torch CPU threads")
    device: str = Field("auto", description="auto (cuda when present) | cpu | cuda | cuda:N")
    log_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(500, ge=1)


def validate_config(model: type[M], raw: dict, where: str) -> M:
    """``model`` from ``raw``; the first validation error becomes a :class:`ConfigError` naming
    ``where`` and the dotted key."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        msg = {"extra_forbidden": "unknown key", "missing": "required key is missing"}.get(
            err["type"], validator_message(err["msg"]))
        raise ConfigError(where, _user_key(raw, err["loc"]) or None, msg) from e


def _user_key(raw: Any, loc: tuple) -> str:
    """The dotted key as the user wrote it: pydantic puts a tagged union's tag into the path
    (``data.neu-seg.hflip``), which is no key of the file; a path element that the file's mapping
    at that point lacks but holds as a value (``source: neu-seg``) is that tag, and is left out."""
    parts, node = [], raw
    for p in loc:
        if isinstance(node, dict) and p not in node and p in node.values():
            continue
        parts.append(str(p))
        node = node.get(p) if isinstance(node, dict) else (
            node[p] if isinstance(node, list) and isinstance(p, int) and p < len(node) else None)
    return ".".join(parts)


#: top-level sections only an ARCD training config has
ARCD_ONLY_KEYS = frozenset({"stage1", "stage2", "simulation"})


def read_config(path: Path, model: type[M], set_base_dir: bool = True) -> M:
    """Read and validate a training YAML. ``set_base_dir`` fills the config's ``base_dir`` with
    the file's folder (unless the YAML sets it), so relative data roots resolve against it."""
    path = Path(path)
    raw = read_yaml_mapping(path, "training config")
    # a config of another trainer (clgan, fuzzymask, defectgan, ...) says so in `kind`: name that,
    # not the first of its keys this trainer does not know
    want = (model.model_fields.get("kind").default if "kind" in model.model_fields else "arcd")
    other = raw.get("kind")
    if other is None and want != "arcd" and ARCD_ONLY_KEYS & set(raw):
        other = "arcd"  # ARCD's configs carry no `kind`; its stage and simulation sections say it
    if other not in (None, want):
        command = (f"inspector augment {other} train" if other in ("defectgan", "anomalyalign")
                   else f"inspector train {other}")
        article = "an" if str(other)[:1].lower() in "aeiou" else "a"
        # read by trainers and by benchmark scripts on a run's config.yaml alike: no "train it"
        key = "kind" if "kind" in raw else ", ".join(sorted(ARCD_ONLY_KEYS & set(raw)))
        raise ConfigError(str(path), key, f"{article} {other} training config, not {want} "
                          f"(`{command}` is its trainer)")
    if set_base_dir:
        raw.setdefault("base_dir", str(path.resolve().parent))
    return validate_config(model, raw, str(path))


def prepare_run_dir(run_dir: Path | None, name: str, resume: bool, create: bool = True,
                    resume_flag: str = "--resume") -> Path:
    """The run folder, by default ``runs/<name>-<UTC time>``, created when ``create``.

    A folder that already holds a checkpoint is refused unless ``resume``: a run is never
    silently overwritten. ``resume_flag`` is how the error tells the user to resume.
    """
    if run_dir is None:
        run_dir = Path("runs") / f"{name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--run-dir {run_dir}: is a file, not a folder; choose another run folder")
    ck_path = run_dir / CHECKPOINT
    if ck_path.exists() and not resume:
        raise RunDirError(f"{ck_path}: a run is already here; pass {resume_flag} to continue it "
                          f"or choose another run folder")
    if create:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a parent that is a file, a folder this user may not write
            raise RunDirError(f"--run-dir {run_dir}: cannot create the folder ({e.strerror or e})") from None
    return run_dir


class RunDirError(FileExistsError):
    """A ``--run-dir`` that cannot take this run (a run already there, a file, not writable): bad
    input, exit 2 (a FileExistsError, which the commands already treat so)."""


def write_run_config(run_dir: Path, cfg: BaseModel) -> None:
    """``config.yaml``: the resolved config, in the order of its fields."""
    (run_dir / CONFIG).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename (:func:`inspector.fileio.atomic_path`): a
    run killed mid-write keeps its previous checkpoint instead of a truncated one."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_metrics(run_dir: Path, metrics: dict, **json_kw: Any) -> None:
    """``metrics.json``, replaced whole: the exporters decide from it whether the run's figures
    belong to the checkpoint, so a torn file must not be left behind."""
    atomic_write_text(Path(run_dir) / METRICS, json.dumps(metrics, indent=2, **json_kw))


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's dict, on the CPU; tensors and plain data only (``weights_only``)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint (train first, or pass the run folder)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, UnicodeDecodeError, EOFError...
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}): the file is "
                              "truncated, corrupt or not a torch checkpoint; restore it or retrain") from e
    if not isinstance(ck, dict):
        raise CheckpointError(f"{path}: holds a {type(ck).__name__}, not a training checkpoint")
    return ck


def step_generator(seed: int, step: int, stream: int = 0,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator for the random draws of training step ``step`` (patch locations, noise,
    gradient-penalty mixing), a pure function of (seed, stream, step).

    The global torch RNG is seeded once at start and is not in the checkpoint, so draws from it
    after ``--resume`` differ from an uninterrupted run's; a generator per step makes a resumed
    run bit-exact (CPU) with no RNG state to save, and the same on every rank.
    """
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(stream), int(step)]).generate_state(2)
    return torch.Generator(device=device).manual_seed((int(state[0]) << 31) ^ int(state[1]))


def saved_config(saved: Any, config_cls: type[BaseModel]) -> dict:
    """A checkpoint's saved config with today's defaults filled in, so that a key added since it
    was written compares equal in :func:`check_resume_keys` when the resumed config leaves it at
    its default; one this version cannot read is compared as saved."""
    try:
        return config_cls.model_validate(saved).model_dump(mode="json")
    except (ValidationError, TypeError):
        return dict(saved) if isinstance(saved, dict) else {}


def config_changes(saved: dict, current: dict) -> dict[str, list]:
    """Every dotted key whose value differs between a checkpoint's saved config and the config
    a run resumes with, as ``{key: [saved, current]}`` in the current config's order (a key one
    side lacks reads None); lists and tuples compare as lists, as YAML and JSON give them."""
    out: dict[str, list] = {}
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in list(b) + [k for k in a if k not in b]:
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
        elif norm(a) != norm(b):
            out[key] = [norm(a), norm(b)]

    walk(saved, current, "")
    return out


#: config keys of how a run is executed, not of what it learns (changed on a resume without a
#: warning: another machine, more threads)
RUN_KEYS = ("name", "threads", "device", "data_workers", "channels_last", "log_every",
            "checkpoint_every", "checkpoint_every_s", "max_minutes",
            # the config file's folder, filled in by read_config: a run moved to another machine
            # or clone changes it; the data it points to is compared by the trainers themselves
            "base_dir")


def learnt_changes(changed: dict[str, list]) -> str:
    """``key old -> new, ...`` of the :func:`config_changes` that change what is learnt (not
    :data:`RUN_KEYS`); empty when there are none."""
    return ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changed.items()
                     if k.split(".")[0] not in RUN_KEYS)


def warn_config_changes(saved: dict, current: dict, config: str | Path, ck_path: Path,
                        at: str, base_dirs: tuple[str | Path | None, str | Path | None] | None = None
                        ) -> dict[str, list]:
    """Warn when a resume's config differs from its checkpoint's in a key that changes what is
    learnt (a resume used to rewrite config.yaml with the new values without a word, while the
    steps before it were trained with the old); returns every change (:func:`config_changes`).

    A data folder (a key named ``root``: ``data.root``, ``data.sources.<i>.root``) that names
    the same folder once resolved is not warned of: ``../data/x`` rewritten as ``/abs/data/x``
    used to read as other training data. A relative one resolves against its config's
    ``base_dir`` (the config file's folder, which ``read_config`` fills in), or against
    ``base_dirs`` (saved, current) where given: a trainer whose relative roots are taken from
    the working directory passes the one of the checkpoint's run and today's."""
    changed = config_changes(saved, current)
    bases = base_dirs or (saved.get("base_dir"), current.get("base_dir"))

    def resolved(cfg: Any, base: str | Path | None) -> Any:
        """``cfg`` with every ``root`` made an absolute, resolved path (lists of sources too;
        resolve(): a symlinked shared/ and its target are the same folder)."""
        if isinstance(cfg, dict):
            return {k: (str((Path(base or ".") / Path(v).expanduser()).resolve())
                        if k == "root" and isinstance(v, str) and v else resolved(v, base))
                    for k, v in cfg.items()}
        if isinstance(cfg, (list, tuple)):
            return [resolved(v, base) for v in cfg]
        return cfg

    # keys that differ only in how a data folder is spelt (a list of sources is one key)
    real = config_changes(resolved(saved, bases[0]), resolved(current, bases[1]))
    text = learnt_changes({k: v for k, v in changed.items() if k in real})
    if text:
        log.warning("%s differs from the config of %s: %s; the steps from %s on use the new "
                    "value(s), the earlier ones were trained with the old (config.yaml now holds "
                    "this config)", config, ck_path, text, at)
    return changed


def check_resume_keys(saved: dict, current: dict, keys: Iterable[str], config: str | Path,
                      ck_path: Path) -> None:
    """Refuse a resume whose config changed one of ``keys`` (dotted; a section means every key
    in it), naming the first differing dotted key: the checkpoint's tensors have the saved
    network's shapes, and ``load_state_dict`` would fail with a traceback (or, for a key that
    changes no shape, silently train another network)."""
    changed = config_changes(saved, current)  # the one comparison, shared with the warnings
    for key in keys:
        for bad, (old, new) in changed.items():
            if bad == key or bad.startswith(key + "."):
                raise ConfigError(str(config), bad, f"{new!r}, but the checkpoint {ck_path} was "
                                  f"trained with {old!r}; a resumed run keeps its network (put the "
                                  "old value back, or train into a new --run-dir)")


def trim_losses(path: Path, step: int, key: str = "it") -> int:
    """Cut ``losses.jsonl`` back to the rows of steps ``<= step``, the step training goes on from;
    returns how many rows were dropped.

    The file is appended to as training runs, a checkpoint only every ``checkpoint_every``
    steps: a run that died without saving (a crash, an OOM kill, a power loss) left rows past its
    last checkpoint, and the resumed run writes those steps again, so readers saw repeated and
    out-of-order steps. A line that is not a JSON object with an integer ``key`` (the torn last
    line of a run killed mid-write) goes too. The file is replaced atomically, and only when that
    changes it (a missing file stays missing). Call it on rank 0 before training starts, with the
    checkpoint's step (0 for a run that starts afresh in a folder a dead run left rows in).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    keep: list[str] = []
    corrupt: list[int] = []  # 1-based line numbers of rows that are no JSON row with the step
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get(key), int)):
            corrupt.append(number)
        elif row[key] <= step:
            keep.append(line)
    dropped = len(lines) - len(keep)
    if dropped or (text and not text.endswith("\n")):  # no next row glued to an unended line
        atomic_write_text(path, "".join(f"{line}\n" for line in keep))
    if corrupt:
        # they were reported as rows "past step N", which a corrupt row before the checkpoint is not
        shown = ", ".join(str(n) for n in corrupt[:10]) + (", ..." if len(corrupt) > 10 else "")
        log.warning("%s: dropped %d corrupt row(s) (not a JSON object with an integer %r) at "
                    "line(s) %s of %d", path, len(corrupt), key, shown, len(lines))
    if dropped - len(corrupt):
        log.info("%s: dropped %d row(s) past step %d (written after the checkpoint this run "
                 "goes on from)", path, dropped - len(corrupt), step)
    return dropped


#: the one-line usage error of a training command given ``--resume`` without ``--run-dir`` (it
#: used to start a new run in ``runs/<name>-<time>`` and exit 0)
RESUME_NEEDS_RUN_DIR = "--resume needs --run-dir"


# ---------------------------------------------------------------------------------------------
# Progress figures
# ---------------------------------------------------------------------------------------------

def fmt_duration(s: float) -> str:
    """Seconds as ``MmSSs``, or ``HhMMm`` from an hour on (the log's ETA and train times).

    >>> fmt_duration(75.9), fmt_duration(3 * 3600 + 125), fmt_duration(-4)
    ('1m15s', '3h02m', '0m00s')
    """
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def rate_eta(done: int, seconds: float, left: int) -> tuple[float, float]:
    """(steps per second over ``done`` steps in ``seconds``, seconds for the ``left`` steps).

    >>> rate_eta(10, 5.0, 30)
    (2.0, 15.0)
    """
    rate = done / max(1e-9, seconds)
    return rate, left / max(rate, 1e-9)


def update_ema(ema: dict[str, float], values: dict[str, float]) -> None:
    """Fold ``values`` into the running averages ``ema`` (weight 0.02 each) in place; a new key
    starts at its value."""
    for k, v in values.items():
        ema[k] = v if k not in ema else 0.98 * ema[k] + 0.02 * v


# ---------------------------------------------------------------------------------------------
# Devices and torchrun
# ---------------------------------------------------------------------------------------------

class Ranks(NamedTuple):
    """This process's place under torchrun (world 1, rank 0 when started alone)."""

    world: int
    rank: int
    local_rank: int

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run folder and logs progress."""
        return self.rank == 0


def init_distributed(nccl: bool) -> Ranks:
    """Join the process group when ``torchrun`` started more than one process (it sets
    WORLD_SIZE, RANK and LOCAL_RANK); NCCL when ``nccl``, else gloo. A single process joins
    nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return Ranks(world, 0, local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if nccl else "gloo")
    return Ranks(world, dist.get_rank(), local_rank)


def check_device(spec: str, config: str | Path) -> None:
    """Refuse a config's ``device`` this machine cannot train on, naming the file and key.

    Without this, ``device: cuda`` on a CPU-only torch fails at the first ``.to()`` with
    torch's "not compiled with CUDA" traceback, after the run folder was made.
    """
    if spec == "auto":
        return
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(str(config), "device", f"'{spec}' is not a device; use auto, cpu, "
                          "cuda or cuda:N") from None
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ConfigError(str(config), "device", f"'{spec}', but torch {torch.__version__} "
                          f"({build}) sees no CUDA GPU; set device: cpu or auto")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise ConfigError(str(config), "device", f"'{spec}', but torch sees {n} GPU(s) "
                          f"(cuda:0..cuda:{n - 1})")


def pick_device(spec: str, local_rank: int) -> torch.device:
    """``auto``: GPU ``local_rank`` when CUDA is present, else the CPU; ``cuda``: GPU
    ``local_rank`` (one GPU per torchrun process); anything else as written."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if spec == "cuda" and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    return torch.device(spec)


def start_ranks(device: str, threads: int, seed: int,
                config: str | Path) -> tuple[Ranks, torch.device]:
    """Process group, device (:func:`pick_device`), CPU threads and seed for a training run.

    NCCL whenever CUDA is present and the config does not ask for the CPU. The seed is the same
    on every rank, so all networks start from the same weights. A device this machine lacks is a
    :class:`ConfigError` naming ``config`` (:func:`check_device`).
    """
    check_device(device, config)
    ranks = init_distributed(nccl=torch.cuda.is_available() and device != "cpu")
    dev = pick_device(device, ranks.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return ranks, dev


def end_ranks(net: torch.nn.Module, world: int, dev: torch.device, what: str,
              log: logging.Logger | None = None) -> list[float]:
    """Check that every rank ended with the same ``net``, then leave the process group.

    Every rank applied the same averaged gradients to the same start, so the weights must agree;
    a parameter-sum checksum that differs raises RuntimeError ("different <what>s"). With ``log``,
    rank 0 logs the checksums first.
    """
    s = torch.stack([p.detach().double().sum() for p in net.parameters()]).sum().reshape(1).to(dev)
    all_s = [torch.zeros_like(s) for _ in range(world)]
    dist.all_gather(all_s, s)
    sums = [float(v) for v in all_s]
    if log is not None and dist.get_rank() == 0:
        log.info("%s checksum per rank: %s", what, ", ".join(f"{v:.8f}" for v in sums))
    dist.barrier()
    dist.destroy_process_group()
    release_held_signals()  # a stop that came after the last step acts now, on the usual handler
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
        raise RuntimeError(f"ranks ended with different {what}s (checksums {sums})")
    return sums


# ---------------------------------------------------------------------------------------------
# python -m export.<kind>.train
# ---------------------------------------------------------------------------------------------

#: what the command reports as one error line (exit 2) rather than a traceback
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, FileExistsError, FileNotFoundError, ValueError)


#: exit status of a training command stopped by Ctrl-C or SIGTERM after saving its checkpoint
#: (128 + SIGINT, what a shell reports for Ctrl-C)
EXIT_INTERRUPTED = 130


class TrainingStopped(KeyboardInterrupt):
    """A stop (Ctrl-C, SIGTERM) whose trainer says what it left on disk: ``reason`` is the
    signal, ``saved`` the truthful state of the run folder ("no checkpoint saved (none yet)",
    "checkpoint of stage 2 step 40 saved ...", "... --resume writes metrics.json"). The commands
    print it as their one line instead of a generic "continue with --resume"."""

    def __init__(self, reason: str, saved: str):
        super().__init__(f"{reason}; {saved}")
        self.reason, self.saved = reason, saved


@contextmanager
def whole_step(kept: Callable[[], str] | None = None) -> Iterator[None]:
    """Ctrl-C or SIGTERM arriving inside the block takes effect when the block ends.

    Wrap one training step in it: the optimiser update(s) and the step counter. A
    ``KeyboardInterrupt`` raised in the middle (after the critic's update, before the
    generator's; after ``opt.step()``, before the counter moved on) made the trainer save weights
    one update ahead of its step count, so ``--resume`` repeated that update and was no longer
    the run an uninterrupted one would have been. Here the first signal is held and raised as
    ``KeyboardInterrupt`` once the step is complete; a second one during the same step gives up
    waiting and ends the process at once by the signal's default action (nothing is saved: the
    last checkpoint, written atomically, survives); ``kept``, where given, says which one that is
    in the line logged then (the last line the user sees). Outside the main thread nothing
    changes.

    Under torchrun the stop is agreed between the ranks when the step ends (one all-reduce of a
    flag, :func:`_any_rank_stops`): the signal reaches each worker at its own moment, and a rank
    that carried on alone into the next step would wait in its gradient all-reduce for a rank
    that had stopped (until NCCL's timeout) or die there without a checkpoint. So every rank stops
    after the same step, whichever got the signal.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ddp = _in_process_group()
    if ddp and _DDP_HOLD.active:
        # under torchrun the handlers stay in place between steps (see _DDP_HOLD)
        held, previous = _DDP_HOLD.held, _DDP_HOLD.previous
    else:
        held = []
        # a handler installed from C reads as None: put the default back for it. A signal the
        # process ignores (a script's background job ignores SIGINT) stays ignored.
        previous = {s: signal.getsignal(s) or signal.SIG_DFL for s in (signal.SIGINT, signal.SIGTERM)}
        previous = {s: h for s, h in previous.items() if h is not signal.SIG_IGN}

        def hold(signum: int, frame: object) -> None:
            if held:
                # the trainer's last words: the first signal's line promised a save after the step
                what = ""
                if kept is not None:
                    try:
                        what = f"; {kept()}"
                    except Exception:  # never let the description keep the process alive
                        what = ""
                log.warning("%s again: stopping at once, nothing saved of this step%s",
                            signal.Signals(signum).name, what)
                for s, h in previous.items():
                    signal.signal(s, h)
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            held.append(signum)
            log.warning("%s: stopping after this step (a second one stops at once, without saving)",
                        signal.Signals(signum).name)

        for s in previous:
            signal.signal(s, hold)
        if ddp:
            # a signal between two steps (loading the next batch) would otherwise stop this
            # rank at once while the others go on into a collective that never completes; held,
            # it is agreed at the end of the next step like one inside it
            _DDP_HOLD.active, _DDP_HOLD.held, _DDP_HOLD.previous = True, held, previous
    try:
        yield
    except Exception as e:
        if not held:
            if ddp:
                release_held_signals()
            raise
        if ddp:
            release_held_signals(redeliver=False)
        # the stop broke the step from outside (a DataLoader worker or another DDP rank that
        # stopped first): still a stop, so the trainer saves its checkpoint as it did before
        raise KeyboardInterrupt(f"signal {signal.Signals(held[0]).name} ({first_line(e)})") from e
    finally:
        if not ddp:
            for s, h in previous.items():
                signal.signal(s, h)
    if _any_rank_stops(bool(held)):
        if ddp:
            release_held_signals(redeliver=False)
        raise KeyboardInterrupt(f"signal {signal.Signals(held[0]).name}" if held
                                else "another rank was stopped by a signal")


class _DdpHold:
    """Signal handling between the steps of a torchrun job: :func:`whole_step` installs its
    holding handler at the first step and leaves it in place until the stop is agreed, the
    job ends (:func:`end_ranks`) or a step fails."""

    def __init__(self) -> None:
        self.active = False
        self.held: list[int] = []
        self.previous: dict = {}


_DDP_HOLD = _DdpHold()


def release_held_signals(redeliver: bool = True) -> None:
    """Put back the handlers :func:`whole_step` holds signals with under torchrun. A signal held
    but not yet acted on (it came after the last step) is delivered again, now to the restored
    handler, so it is not lost. Does nothing outside a torchrun job's steps."""
    if not _DDP_HOLD.active:
        return
    held, previous = _DDP_HOLD.held, _DDP_HOLD.previous
    _DDP_HOLD.active, _DDP_HOLD.held, _DDP_HOLD.previous = False, [], {}
    for s, h in previous.items():
        signal.signal(s, h)
    if redeliver and held:
        os.kill(os.getpid(), held[0])


def _in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _any_rank_stops(here: bool) -> bool:
    """Whether this rank or any other holds a stop signal (an all-reduce MAX of one flag; this
    rank's answer alone outside a process group). Every rank calls it once per step, in step."""
    if not _in_process_group():
        return here
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    flag = torch.tensor([1 if here else 0], dtype=torch.int32, device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def quiet_worker(_worker_id: int = 0) -> None:
    """For DataLoader workers (``worker_init_fn``): ignore SIGINT / SIGTERM. A Ctrl-C or a
    ``kill`` of the process group reaches the workers too; dying at once, they broke the step the
    main process was finishing under :func:`whole_step`. The main process stops them when it
    stops, and they exit by themselves when it dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train_main(argv: list[str] | None, *, kind: str, doc: str, train: Callable[..., Path],
               log: logging.Logger, max_iters: str | None = None,
               errors: tuple[type[Exception], ...] = USER_ERRORS) -> int:
    """The ``python -m export.<kind>.train`` command: flags, logging to stderr, then
    ``train(config, run_dir, resume[, max_iters])``; 0 with the run folder, 2 on ``errors``.

    ``doc`` is the trainer module's docstring (its first line describes the command);
    ``max_iters`` names the trainer's unit ("steps") and adds ``--max-iters``.
    """
    p = argparse.ArgumentParser(prog=f"python -m export.{kind}.train", description=doc.split("\n")[0])
    p.add_argument("--config", required=True, type=Path, help="training YAML")
    p.add_argument("--run-dir", type=Path, default=None, help="run folder (default runs/<name>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --run-dir")
    if max_iters:
        p.add_argument("--max-iters", type=int, default=None, help=f"stop after this many more {max_iters} in this invocation "
                                                                   "(on --resume: more, not a total)")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    if a.resume and a.run_dir is None:
        print(f"{p.prog}: error: {RESUME_NEEDS_RUN_DIR}", file=sys.stderr)
        return 2
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extra = (a.max_iters,) if max_iters else ()
    try:
        with sigterm_as_interrupt():
            out = train(a.config, a.run_dir, a.resume, *extra)
    except errors as e:
        log.error("%s", e)
        return 2
    except TrainingStopped as e:  # the trainer says what it saved
        log.error("training stopped (%s); %s", e.reason, e.saved)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt as e:
        log.error("training stopped (%s); continue with --resume", str(e) or "Ctrl-C")
        return EXIT_INTERRUPTED
    log.info("run folder: %s", out)
    return 0


# ---------------------------------------------------------------------------------------------
# For the exporters
# ---------------------------------------------------------------------------------------------

#: checkpoint kinds ``inspector export onnx`` has an exporter for (ARCD's checkpoints carry no
#: ``kind``: they are recognised by their networks)
EXPORT_KINDS = ("arcd", "clgan", "fuzzymask")


def _config_kind(run_dir: Path) -> tuple[bool, object]:
    """(config.yaml is a readable mapping, its ``kind``)."""
    p = Path(run_dir) / CONFIG
    if not p.is_file():
        return False, None
    try:
        raw = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return False, None
    return (True, raw.get("kind")) if isinstance(raw, dict) else (False, None)


def _checkpoint_kind(run_dir: Path) -> tuple[bool, object]:
    """(checkpoint.pt is a readable dict, the kind it names: its ``kind``, or ``arcd`` for ARCD's
    networks). Memory-mapped: only the small pickle is read, not the weights."""
    p = Path(run_dir) / CHECKPOINT
    if not p.is_file():
        return False, None
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable: the exporter's own load reports it, naming the file
        return False, None
    if not isinstance(ck, dict):
        return False, None
    if ck.get("kind") is not None:
        return True, ck["kind"]
    if "reconstruction" in ck and "discrimination" in ck:
        return True, "arcd"
    return True, None


def run_kind(run_dir: Path) -> object:
    """Which trainer wrote ``run_dir`` (how ``inspector export onnx`` picks the exporter): the
    checkpoint's ``kind``, else ``config.yaml``'s; None for an ARCD run (its config has no
    ``kind``), which the command exports with the ARCD exporter.

    The checkpoint is what gets exported, so it wins: a run folder without config.yaml (copied
    without it) or with one from another run would otherwise go to the wrong exporter and fail
    with a validation traceback. A folder where neither names a kind raises
    :class:`CheckpointError` naming the folder (one line from the command, exit 2).
    """
    run_dir = Path(run_dir)
    has_cfg, cfg_kind = _config_kind(run_dir)
    has_ck, ck_kind = _checkpoint_kind(run_dir)
    if ck_kind is not None:
        if has_cfg and (cfg_kind or "arcd") != ck_kind:
            log.warning("%s says kind %s but %s is a checkpoint of kind %s: exporting it as %s",
                        run_dir / CONFIG, cfg_kind or "arcd (no kind)", run_dir / CHECKPOINT,
                        ck_kind, ck_kind)
        if ck_kind not in EXPORT_KINDS:
            raise CheckpointError(f"{run_dir / CHECKPOINT}: a checkpoint of kind {ck_kind}; inspector "
                                  f"export onnx exports {', '.join(EXPORT_KINDS)} runs")
        return None if ck_kind == "arcd" else ck_kind
    if has_cfg:  # as before: config.yaml decides (no kind: ARCD), the exporter checks the checkpoint
        return cfg_kind
    if has_ck:
        raise CheckpointError(f"{run_dir}: neither {CONFIG} (missing or unreadable) nor "
                              f"{CHECKPOINT} (no 'kind') says which trainer wrote this run; "
                              "restore the run's config.yaml")
    return None  # nothing readable: the ARCD exporter reports the missing checkpoint, as before


def read_metrics(run_dir: Path, deleted: str | None = None) -> dict | None:
    """``run_dir/metrics.json`` as a dict, None when there is none; a damaged one is a one-line
    :class:`CheckpointError` naming it. ``deleted``: what deleting a damaged one leads to (the
    advice of the error), where it is not "the exporter then works from the checkpoint"."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); " + (deleted or (
            "restore it, or delete it (the exporter then works from the checkpoint alone: no "
            "figures of the run in the bundle)"))) from e
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{path}: holds a {type(metrics).__name__}, not the run's metrics")
    return metrics


def metrics_for_checkpoint(run_dir: Path, ck: dict) -> tuple[dict, bool | None]:
    """``run_dir/metrics.json`` and whether it describes the checkpoint ``ck`` being exported.

    The trainers write metrics.json once, at the end of a run, with ``checkpoint_step``; a run
    stopped later (Ctrl-C, SIGTERM, a crash) after a ``--resume`` leaves the metrics of the
    earlier run beside a newer checkpoint. Returns (metrics, True) when the steps agree,
    (metrics, False) when they differ (the caller must not use its figures as the checkpoint's),
    (metrics, None) for a metrics.json of an older trainer without the step (unchecked: logged)
    or none at all ({}).
    """
    path = Path(run_dir) / METRICS
    metrics = read_metrics(run_dir)
    if metrics is None:
        return {}, None
    if "checkpoint_step" not in metrics:
        log.warning("%s has no checkpoint_step (written by an older trainer): its figures are "
                    "taken as the checkpoint's without a check", path)
        return metrics, None
    return metrics, int(metrics["checkpoint_step"]) == int(ck.get("step", -1))


def split_provenance(split_test: float, split_val: float, where: str) -> dict[str, float]:
    """The hash-split fractions a run trained with, for the bundle's ``provenance.split_fractions``
    (``inspector evaluate`` and ``calibrate dual-threshold`` / ``residual-window`` split with
    them); logs a warning when they are not the defaults, since ``calibrate thresholds`` and
    ``calibrate convergence`` take theirs from ``--check-fraction`` / ``--calib-fraction``.
    """
    from inspector.evaluation.datasets import DEFAULT_SPLIT

    if (split_test, split_val) != (DEFAULT_SPLIT.test, DEFAULT_SPLIT.val):
        log.warning("%s: trained with split_test %g / split_val %g, not the default %g / %g: "
                    "evaluate splits with them (provenance.split_fractions); for `calibrate "
                    "thresholds` and `convergence` pass --check-fraction %g --calib-fraction %g, "
                    "or they calibrate on images this model was trained on",
                    where, split_test, split_val, DEFAULT_SPLIT.test, DEFAULT_SPLIT.val,
                    split_test, split_val)
    return {"test": float(split_test), "val": float(split_val)}


def git_commit(start: Path) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files had uncommitted changes) of the checkout at
    ``start``, for a bundle's provenance; None where git or the checkout is absent."""
    def git(*args: str) -> str | None:
        try:
            # its own session: a terminal's Ctrl-C reaches the whole foreground group, and an
            # export holding that stop until its bundle is whole must not lose its commit to it
            out = subprocess.run(["git", *args], cwd=start, capture_output=True, text=True,
                                 timeout=10, check=True, start_new_session=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "HEAD") or None, (None if status is None else bool(status))

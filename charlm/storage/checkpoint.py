"""The typed, versioned checkpoint: layout, atomic writes, `weights_only` loads, upgrades.

A checkpoint file is a dict of tensors and plain Python values only, so it always loads with
`torch.load(..., weights_only=True)`; nothing is ever unpickled any other way. In memory it
is a `Checkpoint`, grouped by concern::

    format, version            "charlm", VERSION
    model                      the weights to use (with --ema, the average), a state dict
    live                       with --ema: the training weights themselves (for resume)
    config                     {"model", "train", "session"}: the run's settings
    vocab                      the characters, in id order
    optimizer, scaler          their state dicts
    progress                   step, characters seen, training seconds, val bpc, loss window,
                               data position
    plan                       the time budget (`BudgetState`): planned steps, whether fixed,
                               measured costs, seconds spent
    hidden                     the carried hidden state of every stream
    ranks                      per process: RNG states, loss window, weight digest
    corpus                     sources, documents, SHA-256 of their bytes, size, encoding
    trained_on                 device, precision, process count, the machine (CPU model and
                               kernels, or GPU; threads; PyTorch: "" in files older than it)
    init                       where a fine-tuned run started: the checkpoint's path, step,
                               corpus sources and SHA-256, the vocabulary merge ({}: from scratch)
    planner                    what the planner chose and why (None: the settings were given)
    digest                     a CRC-32 of each part above (`charlm.storage.digest`), written with
                               the file and checked on every load (format 5 on; older files load
                               unverified)

Files are replaced atomically (`charlm.fs`), so a crash at any moment leaves the previous
file intact; bytes that change after (a failing disk, a bad copy, a sync tool) are found by
the digest: PyTorch's zip format carries CRC-32s that its reader never checks, so charlm
checks its own, part by part, and says which part is damaged and which checkpoint of the run
folder is intact. Older versions are upgraded on load (`_upgrade`). `checkpoint_bytes` is what a
file takes on disk and while it is serialized in memory.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from charlm.config.run import RunConfig
from charlm.errors import CharLMError
from charlm.storage.digest import METADATA, digests, seal
from charlm.storage.rundir import BEST, LATEST

FORMAT = "charlm"
# 5: the digest; 4: the seconds a budget has spent (plan.spent); 3: the init, planner and
# live groups; 2: grouped layout and [session] config; 1: one flat dict.
VERSION = 5  # older versions are upgraded on load
DIGESTED = 5  # the first version with a digest
CHECKPOINT_MARGIN = 32 * 1024  # RNG states, settings, vocabulary, zip headers


def checkpoint_bytes(parameters: int, hidden_values: int, ema: bool = False) -> int:
    """Estimated size of one checkpoint: the weights and AdamW's two moments, all fp32 (12
    bytes per parameter; with --ema also the live weights, 4 more), the carried hidden state
    (fp32 at most) and `CHECKPOINT_MARGIN` for the rest (benchmarks/RESULTS.md: within 1 % of
    real files above a million parameters)."""
    return (16 if ema else 12) * parameters + 4 * hidden_values + CHECKPOINT_MARGIN


@dataclass
class BudgetState:
    """What a checkpoint keeps of the time budget (`charlm.training.budget` writes it): the
    run's length and the measured costs."""

    total_steps: int | None = None  # None: a --time run still measuring
    steps_fixed: bool = False  # the step count (and so the schedule) no longer changes
    sec_per_step: float | None = None
    eval_seconds: float | None = None  # one evaluation, saving and previews included
    # Seconds of the --time budget in force spent so far, over every session: the planner's
    # probe, steps, evaluations and saves (what a resume that finishes the budget subtracts).
    spent: float = 0.0


@dataclass
class Progress:
    """How far the run has come."""

    step: int = 0
    chars_seen: int = 0
    elapsed: float = 0.0  # training seconds over all sessions
    best_val_bpc: float | None = None
    last_val_bpc: float | None = None
    loss_window: list[float] = field(default_factory=lambda: [0.0, 0])  # bits sum, steps since the last eval
    data: dict[str, int] = field(default_factory=lambda: {"pos": 0, "epoch": 0})  # the batcher's position
    since_best: int = 0  # evaluations since the best validation bpc (for --patience)


@dataclass
class RankState:
    """What differs between the processes of a torchrun launch (the only one when alone)."""

    rng: dict[str, Any]
    loss_window: list[float]
    weights_sha256: str | None = None  # under torchrun: every rank's must be equal


@dataclass
class TrainedOn:
    device: str = "cpu"
    precision: str = "fp32"
    world_size: int = 1
    machine: str = ""  # `charlm.device.machine`; files written before it hold none


@dataclass
class Checkpoint:
    """Everything needed to sample from a run and to resume it exactly."""

    model: dict[str, torch.Tensor]
    config: RunConfig
    vocab: str
    corpus: dict[str, Any]
    optimizer: dict[str, Any] = field(default_factory=dict)
    scaler: dict[str, Any] = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)
    budget: BudgetState = field(default_factory=BudgetState)  # the file's "plan" group
    hidden: list[torch.Tensor] = field(default_factory=list)
    ranks: list[RankState] = field(default_factory=list)
    trained_on: TrainedOn = field(default_factory=TrainedOn)
    init: dict[str, Any] = field(default_factory=dict)  # {} for a run trained from scratch
    planner: dict[str, Any] | None = None  # the plan's summary, reasons and numbers
    live: dict[str, torch.Tensor] | None = None  # with --ema: the weights training goes on from
    file_version: int = VERSION  # the format the file was written in (older ones are upgraded)
    verified: bool = True  # its digest was checked (False: a file older than digests)

    def to_dict(self) -> dict[str, Any]:
        """The plain dict a file holds (tensors and plain values only)."""
        return {"format": FORMAT, "version": VERSION, "model": self.model, "config": self.config.to_dict(),
                "vocab": self.vocab, "corpus": self.corpus, "optimizer": self.optimizer,
                "scaler": self.scaler, "progress": dataclasses.asdict(self.progress),
                "plan": dataclasses.asdict(self.budget), "hidden": self.hidden,
                "ranks": [dataclasses.asdict(r) for r in self.ranks],
                "trained_on": dataclasses.asdict(self.trained_on), "init": self.init, "planner": self.planner,
                "live": self.live}

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str) -> Checkpoint:
        return cls(model=d["model"], config=RunConfig.from_dict(d["config"], origin), vocab=d["vocab"],
                   corpus=d["corpus"], optimizer=d["optimizer"], scaler=d["scaler"],
                   progress=Progress(**d["progress"]), budget=BudgetState(**d["plan"]), hidden=d["hidden"],
                   ranks=[RankState(**r) for r in d["ranks"]], trained_on=TrainedOn(**d["trained_on"]),
                   init=d["init"], planner=d["planner"], live=d["live"])


def serialize(ck: Checkpoint) -> bytes:
    buf = io.BytesIO()
    torch.save(seal(ck.to_dict()), buf)
    return buf.getvalue()


class Damaged(CharLMError):
    """A checkpoint whose bytes changed after it was written (its digest does not hold)."""


def _verify(obj: dict[str, Any], path: Path, beside: bool) -> None:
    """Refuse a file whose parts do not match the digest written with it (with `beside`,
    naming the newest intact checkpoint in its folder)."""
    digest = obj.get("digest")
    written = digest.get("parts") if isinstance(digest, dict) else None
    if not isinstance(written, dict):
        raise Damaged(_damage(path, METADATA, "its checksums are missing", beside))
    found = digests(obj)
    bad = [p for p in sorted(set(found) | set(written)) if found.get(p) != written.get(p)]
    if bad:
        raise Damaged(_damage(path, " and ".join(bad), "do not match the checksums written with it", beside))


def _damage(path: Path, part: str, what: str, beside: bool) -> str:
    """The line for a damaged file: which part, why it happens, and what is intact beside it."""
    text = (f"{path}: damaged: its {part} {what} (the file changed after charlm wrote it: a failing "
            "disk, a bad copy or a sync tool)")
    if not beside:
        return text
    other = newest_intact(path.parent, skip=path)
    if other is None:
        return text + f"; no other checkpoint in {path.parent} is intact"
    step, good = other
    return text + f"; the newest intact checkpoint beside it is {good} (step {step:,}): charlm resume {good}"


def verify_files(target: Path) -> list[tuple[Path, bool, bool, int | None, str]]:
    """Every checkpoint of run folder `target` (or the one file): (path, intact, verified by
    its checksums, step, the problem when it is not intact), newest step files last."""
    if target.is_dir():
        files = sorted(target.glob("*.pt"))
        if not files:
            raise CharLMError(f"{target}: no checkpoints (*.pt) in this folder")
    elif target.exists():
        files = [target]
    else:
        raise CharLMError(f"{target}: no such checkpoint or folder")
    out: list[tuple[Path, bool, bool, int | None, str]] = []
    for p in files:
        try:
            ck = _load(p, beside=False)
        except CharLMError as exc:
            out.append((p, False, False, None, str(exc)))
            continue
        out.append((p, True, ck.verified, ck.progress.step, ""))
    return out


def newest_intact(folder: Path, skip: Path | None = None) -> tuple[int, Path] | None:
    """(step, path) of the checkpoint in `folder` with the most steps that loads and verifies."""
    best: tuple[int, Path] | None = None
    for p in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
        if skip is not None and p.resolve() == skip.resolve():
            continue
        try:
            ck = _load(p, beside=False)
        except CharLMError:
            continue
        # At the same step, latest.pt, then a step file, then best.pt (an average with --ema).
        if best is None or (ck.progress.step, _preferred(p)) > (best[0], _preferred(best[1])):
            best = (ck.progress.step, p)
    return best


def _preferred(p: Path) -> int:
    return 2 if p.name == LATEST else 0 if p.name == BEST else 1


def load(path: Path | str) -> Checkpoint:
    """Load and validate a charlm checkpoint on the CPU; never modifies the file.

    Raises `CharLMError` with one line saying what is wrong for missing, truncated,
    corrupt, unsafe (pickled objects), foreign, too-new or incomplete files, `Damaged` for a
    file whose digest does not hold (naming the part, and the newest intact checkpoint
    beside it).
    """
    return _load(Path(path), beside=True)


def _load(path: Path, beside: bool) -> Checkpoint:
    obj = _read(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CharLMError(f"{path}: not a charlm checkpoint (a PyTorch file of another kind)")
    version = obj.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CharLMError(f"{path}: charlm checkpoint with an invalid format version {version!r}")
    if version > VERSION:
        raise CharLMError(
            f"{path}: written by a newer charlm (checkpoint format {version}, this charlm reads "
            f"up to {VERSION}); upgrade charlm"
        )
    if version >= DIGESTED:
        _verify(obj, path, beside)
    try:
        ck = Checkpoint.from_dict(_upgrade(obj), str(path))
    except (KeyError, TypeError) as exc:
        raise CharLMError(f"{path}: incomplete charlm checkpoint (missing or malformed {exc})") from None
    ck.file_version, ck.verified = version, version >= DIGESTED
    _check_finite(ck, path)
    return ck


def _check_finite(ck: Checkpoint, path: Path) -> None:
    """Refuse weights that are not finite numbers (a run saved after it diverged): they sample
    nothing, score NaN and would resume into NaN."""
    for name, t in [*ck.model.items(), *(ck.live or {}).items()]:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CharLMError(f"{path}: its weights are not finite numbers (NaN or infinite, in {name}): "
                              "it was saved after training diverged and cannot be used; train again "
                              "with a lower --lr")


def _read(path: Path) -> Any:
    if not path.exists():
        raise CharLMError(f"{path}: no such checkpoint")
    if path.is_dir():
        raise CharLMError(f"{path}: is a folder, not a checkpoint file")
    # Open it here: an OSError from opening is a real read problem, while torch.load raises
    # OSError(EINVAL) for a truncated file (a seek past the end), which is corruption.
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise CharLMError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        with fh:
            return torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # "Unsupported global: GLOBAL x.y" / "unsupported GLOBAL x.y": a pickled object that
        # weights_only refused. Garbage bytes fail too ("Unsupported operand N"): not unsafe.
        if "unsupported global" in str(exc).lower():
            raise CharLMError(
                f"{path}: refused: it holds pickled Python objects, which charlm never loads "
                "(only tensors and plain values)"
            ) from None
        raise CharLMError(f"{path}: not a checkpoint (corrupt or not a PyTorch file)") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError):
        raise CharLMError(f"{path}: corrupt or truncated checkpoint") from None
    except Exception:
        raise CharLMError(f"{path}: not a checkpoint (corrupt or not a PyTorch file)") from None


def _upgrade(obj: dict[str, Any]) -> dict[str, Any]:
    """Bring an older format up to `VERSION`, one version at a time."""
    if obj["version"] == 1:
        obj = _v1_to_v2(obj)
    if obj["version"] == 2:
        # 3 added three groups; runs before it started from scratch, unplanned, without --ema.
        obj = {**obj, "version": 3, "init": {}, "planner": None, "live": None}
    if obj["version"] == 3:
        # 4 counts every second a budget spent; before it only training steps were counted.
        obj = {**obj, "version": 4, "plan": {**obj["plan"], "spent": obj["progress"]["elapsed"]}}
    if obj["version"] == 4:
        obj = {**obj, "version": 5}  # 5 added the digest, which a file of 4 does not have
    return obj


def _v1_to_v2(old: dict[str, Any]) -> dict[str, Any]:
    """Version 1 was one flat dict; its config kept the session settings under [train]."""
    window = old.get("loss_window", [0.0, 0])
    ranks = old.get("ranks") or [{"rng": old["rng"], "loss_window": window}]
    return {
        "format": FORMAT, "version": 2, "model": old["model"], "vocab": old["vocab"],
        "config": RunConfig.from_dict(old["config"]).to_dict(),  # moves [train] budgets to [session]
        "corpus": old["corpus"], "optimizer": old.get("optimizer", {}), "scaler": old.get("scaler", {}),
        "progress": {"step": old["step"], "chars_seen": old.get("chars_seen", 0),
                     "elapsed": old.get("elapsed", 0.0), "best_val_bpc": old.get("best_val_bpc"),
                     "last_val_bpc": old.get("last_val_bpc"), "loss_window": window,
                     "data": old.get("data", {"pos": 0, "epoch": 0})},
        "plan": {"total_steps": old.get("total_steps"), "steps_fixed": old.get("plan_final", False),
                 "sec_per_step": old.get("sec_per_step"), "eval_seconds": old.get("eval_seconds")},
        "hidden": old.get("hidden", []),
        "ranks": [{"rng": r["rng"], "loss_window": r["loss_window"],
                   "weights_sha256": r.get("weights_sha256")} for r in ranks],
        "trained_on": {"device": old.get("device", "cpu"), "precision": old.get("precision", "fp32"),
                       "world_size": old.get("world_size", 1)},
    }

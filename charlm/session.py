"""Training sessions: start a new run in a folder (`fit`) or continue one (`resume`).

A session validates everything (config, device, corpus, output folder) before its first
write, prepares the run folder, builds a `Trainer`, plans its budget and runs its loop. It
reports through `Callbacks` and stops cleanly when `pending_signal()` returns a signal
number: the step finishes, `latest.pt` is saved, and `TrainingInterrupted` is raised.

What a resume may change follows from the config's types: `SessionConfig` fields may differ
(flags or `--config`), `ModelConfig` and `TrainConfig` fields may not. `plan_resume` holds
those rules as a pure function of the checkpoint and the requested changes.

Launched by torchrun, every process calls these functions; they train one model together,
and rank 0 alone reports and writes files. Bad input that one rank finds stops every rank.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from charlm import checkpoint as ckpt_io
from charlm import diskspace, memory
from charlm.budget import Clock, TimeBudget, guess_eval_seconds
from charlm.config import SESSION_KEYS, RunConfig, parse_duration, sectioned, to_toml
from charlm.data import split
from charlm.device import resolve_device, resolve_precision
from charlm.distributed import Dist, env_rank, from_env, world_size
from charlm.encode import EncodedCorpus, encode_corpus, reopen_corpus
from charlm.errors import CharLMError, CharLMWarning, WriteFailed
from charlm.events import Callbacks, StartInfo, TrainResult
from charlm.options import flag
from charlm.plan import PROBE_STEPS, Plan, Shape, apply_plan, make_plan, step_seconds
from charlm.rundir import RunDir
from charlm.runlock import RunLock
from charlm.train import PendingSignal, Trainer


def _no_signal() -> int:
    return 0


def fit(cfg: RunConfig, specs: list[str] | None, out_dir: Path | str, *, encoding: str | None = None,
        force: bool = False, callbacks: Callbacks | None = None, pending_signal: PendingSignal = _no_signal,
        corpus: EncodedCorpus | None = None, clock: Clock = time.perf_counter,
        explicit: set[str] | None = None) -> TrainResult:
    """Train a new model on CORPUS `specs` (None: nltk:state_union) into `out_dir`.

    With `explicit` (the settings the user chose), the planner fills in every other model
    and recipe setting for this corpus, budget and machine (`charlm.plan`); without it,
    `cfg` is used as it is."""
    cfg.validate()
    run_dir = RunDir(out_dir)
    lock = run_dir.lock(label=f"--out {run_dir.path}")
    device = resolve_device(cfg.session.device)
    time_cap = parse_duration(cfg.session.time) if cfg.session.time else None
    d, device = from_env(device)
    try:
        # Rank 0 alone writes into --out, so its check is the one that counts; a refusal stops
        # every rank (and is printed once). No rank goes on before it is done. The lock comes
        # first: two starts a moment apart must not both find the folder empty.
        d.all_or_none(lambda: _lock_new(lock, run_dir, force) if d.is_main else None)
        callbacks = _for_rank(callbacks or Callbacks(), d)
        if corpus is None:
            corpus = d.local_first(lambda: encode_corpus(specs, encoding, progress=callbacks.on_progress))
        callbacks.on_message(corpus_note(corpus))
        plan = None
        if explicit is not None:
            # Before the planner's probe, which trains the shapes it tries: the settings the
            # user chose may already be impossible.
            need = _check_memory(cfg, len(corpus.vocab), device, d, resumed=False)
            with memory.out_of_memory_as_error(need, cfg, device, resumed=False):
                cfg, plan = plan_run(cfg, explicit, corpus, device, time_cap, d)
            callbacks.on_message(plan.summary())
            if time_cap is not None:  # the probe was part of the budget
                time_cap = max(1.0, time_cap - sum(plan.probe_seconds.values()))
        need = _check_memory(cfg, len(corpus.vocab), device, d, resumed=False)
        with memory.out_of_memory_as_error(need, cfg, device, resumed=False):
            trainer = Trainer(cfg, corpus.vocab, corpus.ids, corpus.desc, run_dir, device, d)
            trainer.planner = plan.record() if plan is not None else None
            config = to_toml(cfg) + (plan.toml_comment() if plan is not None else "")
            d.all_or_none(lambda: _prepare_new(run_dir, config, force, trainer) if d.is_main else None)
            callbacks.on_start(start_info(trainer, resumed=False))
            budget = _budget(trainer, time_cap, cfg.session.max_steps or None, clock)
            return trainer.loop(budget, callbacks, pending_signal)
    finally:
        lock.release()
        d.close()


def _lock_new(lock: RunLock, run_dir: RunDir, force: bool) -> None:
    lock.acquire()
    run_dir.check_new(force)


def _prepare_new(run_dir: RunDir, config: str, force: bool, trainer: Trainer) -> None:
    """Rank 0: empty the folder of an old run (--force), write the config, check the space."""
    run_dir.create(force)
    try:
        run_dir.write_config(config)
    except WriteFailed as exc:
        raise WriteFailed(f"{exc}; nothing of this run was trained or saved", exc.path) from None
    _warn_disk(trainer, existing=0)


def _check_memory(cfg: RunConfig, vocab_size: int, device: torch.device, d: Dist, resumed: bool
                  ) -> memory.Estimate:
    """Every rank's estimate, checked on every rank before the model exists (a refusal stops all)."""
    need = memory.estimate(cfg, vocab_size, resolve_precision(cfg.session.precision, device), d.world_size)
    d.all_or_none(lambda: memory.check(need, cfg, device, resumed))
    return need


def _warn_disk(trainer: Trainer, existing: int) -> None:
    """A warning when --out has less room than the run's checkpoints will take."""
    m, streams = trainer.cfg.model, trainer.cfg.train.batch_size * trainer.dist.world_size
    hidden = m.num_layers * streams * m.hidden_size * (2 if m.cell == "lstm" else 1)
    size = diskspace.checkpoint_bytes(trainer.model.num_parameters(), hidden, ema=bool(trainer.cfg.train.ema))
    note = diskspace.space_warning(trainer.run_dir.path, size, trainer.cfg.session.keep, existing)
    if note is not None:
        warnings.warn(note, CharLMWarning, stacklevel=3)


def plan_run(cfg: RunConfig, explicit: set[str], corpus: EncodedCorpus, device: torch.device,
             time_cap: float | None, d: Dist | None = None) -> tuple[RunConfig, Plan]:
    """The planner's choice for this corpus, budget and machine, and the config it gives.
    Rank 0 measures and plans; every rank gets its plan."""
    d = d or Dist()
    plan = None
    if d.is_main:
        precision = resolve_precision(cfg.session.precision, device)
        vocab = len(corpus.vocab)

        def speed(shape: Shape) -> float:
            # Every process trains its own batch: the run's speed is the world's.
            seconds = step_seconds(shape, vocab, PROBE_STEPS, device, precision, clock=time.perf_counter)
            return shape.batch_size * shape.seq_len * d.world_size / seconds

        train_chars = len(split(corpus.ids, cfg.train.val_fraction).train)
        plan = make_plan(cfg, explicit, train_chars, vocab, time_cap,
                         (cfg.session.max_steps or None), speed, device.type)
    plan = d.broadcast(plan)
    assert plan is not None
    return RunConfig.from_dict(apply_plan(cfg.to_dict(), plan.settings)).validate(), plan


def dry_plan(cfg: RunConfig, specs: list[str] | None, explicit: set[str], *, encoding: str | None = None,
             callbacks: Callbacks | None = None) -> tuple[RunConfig, Plan]:
    """What `fit` would train, without training: the plan and the config it gives."""
    cfg.validate()
    callbacks = callbacks or Callbacks()
    corpus = encode_corpus(specs, encoding, progress=callbacks.on_progress)
    callbacks.on_message(corpus_note(corpus))
    time_cap = parse_duration(cfg.session.time) if cfg.session.time else None
    return plan_run(cfg, explicit, corpus, resolve_device(cfg.session.device), time_cap)


@dataclass
class ResumePlan:
    """How a session continues a run: its settings, budget and what to say about them."""

    cfg: RunConfig
    time_cap: float | None  # this session's seconds (None: no clock)
    max_steps: int | None  # the run's new length, when the session sets one
    extend_by_time: bool = False  # a finished run given --time: as many steps as fit
    notes: list[str] = field(default_factory=list)


def plan_resume(ck: ckpt_io.Checkpoint, origin: str, changes: dict[str, Any],
                config_file: dict[str, Any] | None = None, world_size: int = 1,
                device_available: Callable[[str], bool] = lambda name: True) -> ResumePlan:
    """The rules of a resume, as a pure function of the checkpoint `ck` and what is asked:
    `changes` (flags: session settings only), `config_file` (a parsed --config: session
    settings apply, the run's own settings may be repeated but not changed), the process
    count, and which devices exist. Raises `CharLMError` naming anything not allowed."""
    cfg = RunConfig.from_dict(ck.config.to_dict(), origin)
    file_sections = sectioned(config_file or {}, "--config")
    for section, values in file_sections.items():
        if section == "session":
            continue
        for key, value in values.items():
            candidate = RunConfig.from_dict({section: {key: value}}, "--config")
            have, got = getattr(getattr(cfg, section), key), getattr(getattr(candidate, section), key)
            if have != got:
                raise CharLMError(f"--config: cannot change {section}.{key} on resume (run has {have!r}, got {got!r})")
    for key, value in changes.items():
        if value is not None and key not in SESSION_KEYS:
            raise CharLMError(f"{flag(key)}: cannot be changed on resume")
    # Budgets and cadence may come from the --config file too; flags win over it.
    asked = {**file_sections["session"], **{k: v for k, v in changes.items() if v is not None}}
    cfg.session = replace(cfg.session, **asked)
    cfg.validate()
    plan = ResumePlan(cfg, None, asked.get("max_steps") or None)
    step, total = ck.progress.step, ck.plan.total_steps
    if "device" not in asked and cfg.session.device != "auto" and not device_available(cfg.session.device):
        # Trained on a GPU, resumed where there is none: continue on what is here.
        plan.notes.append(f"the run was trained with --device {cfg.session.device}, which is not "
                          "available here; continuing with --device auto")
        cfg.session.device = "auto"
    if "time" in asked:
        plan.time_cap = parse_duration(cfg.session.time)
    elif total is None and cfg.session.time and plan.max_steps is None:
        # A --time run stopped before it fixed its step count: finish its original budget.
        plan.time_cap = max(1.0, parse_duration(cfg.session.time) - ck.progress.elapsed)
    if plan.max_steps is not None and plan.max_steps < step:
        raise CharLMError(f"--max-steps {plan.max_steps}: the run is already at step {step}")
    if plan.max_steps is None and total is not None and step >= total:
        if plan.time_cap is None:
            raise CharLMError(f"{origin}: the run already finished its {total} steps; extend it with "
                              f"--max-steps N (N > {step}) or --time DURATION")
        if ck.plan.sec_per_step is None:
            raise CharLMError(f"{origin}: the run has no measured speed to plan --time with; use --max-steps")
        plan.extend_by_time = True
    world = ck.trained_on.world_size
    if world != world_size:
        # Same streams, hidden state and global batch, split over a different process count.
        streams = cfg.train.batch_size * world
        if streams % world_size:
            raise CharLMError(f"{origin}: the run trains {streams} streams ({cfg.train.batch_size} per "
                              f"process x {world}), which {world_size} processes cannot share equally")
        cfg.train.batch_size = streams // world_size
        plan.notes.append(f"the run was trained by {world} process(es); continuing in {world_size} with "
                          f"--batch-size {cfg.train.batch_size} each (the same {streams} streams)")
    return plan


def resume(path: Path | str, changes: dict[str, Any] | None = None, *, config_file: dict[str, Any] | None = None,
           callbacks: Callbacks | None = None, pending_signal: PendingSignal = _no_signal,
           clock: Clock = time.perf_counter) -> TrainResult:
    """Continue the run that wrote checkpoint `path`, in the checkpoint's folder (see
    `plan_resume` for what `changes` and `config_file` may hold)."""
    path = Path(path)
    run_dir = RunDir(path.parent)
    lock = run_dir.lock()
    try:
        # Rank 0 takes the run's lock before it reads the checkpoint: a writer that finished a
        # moment ago has saved its last file, and one still running refuses this resume.
        refusal: CharLMError | None = _try_lock(lock) if env_rank() == 0 else None
        ck = ckpt_io.load(path)
        stamp = _stamp(path)
        # The rules give the same answer on every rank: a refusal waits until all of them are
        # in the process group, so that it is printed once.
        try:
            plan = plan_resume(ck, str(path), changes or {}, config_file, world_size(), _device_available)
            device = resolve_device(plan.cfg.session.device)
        except CharLMError as exc:
            refusal, device = refusal or exc, torch.device("cpu")
        d, device = from_env(device)
        try:
            d.all_or_none(lambda: _raise(refusal))
            _same_checkpoint(d, stamp, path)
            callbacks = _for_rank(callbacks or Callbacks(), d)
            corpus = d.local_first(lambda: reopen_corpus(ck.corpus, path, ck.vocab, progress=callbacks.on_progress))
            need = _check_memory(plan.cfg, len(corpus.vocab), device, d, resumed=True)
            with memory.out_of_memory_as_error(need, plan.cfg, device, resumed=True):
                trainer = Trainer(plan.cfg, corpus.vocab, corpus.ids, ck.corpus, run_dir, device, d)
                trainer.load(ck, path)
                budget = _budget(trainer, plan.time_cap, plan.max_steps, clock)
                if plan.max_steps is not None:
                    budget.fix(plan.max_steps)
                elif plan.extend_by_time:
                    assert plan.time_cap is not None
                    budget.fix(budget.steps_for(plan.time_cap, ck.progress.step))
                d.all_or_none(lambda: _prepare_resume(run_dir, plan.cfg, ck.progress.step, trainer)
                              if d.is_main else None)
                callbacks.on_start(start_info(trainer, resumed=True))
                for note in plan.notes:
                    callbacks.on_message(note)
                return trainer.loop(budget, callbacks, pending_signal)
        finally:
            d.close()
    finally:
        lock.release()


def _try_lock(lock: RunLock) -> CharLMError | None:
    """Take `lock`; a refusal is returned to be raised once every rank can hear of it (at once
    in a single process)."""
    try:
        lock.acquire()
    except CharLMError as exc:
        if world_size() == 1:
            raise
        return exc
    return None


def _stamp(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _same_checkpoint(d: Dist, stamp: int, path: Path) -> None:
    """Under torchrun, every rank must have read the same version of the checkpoint (another
    writer may have replaced it before rank 0 took the lock)."""
    if not d.enabled:
        return
    newest, oldest = d.all_max([stamp, -stamp])
    changed = newest != -oldest
    d.all_or_none(lambda: _raise(CharLMError(f"{path}: was replaced while the processes read it; start "
                                             "the resume again") if changed and d.is_main else None))


def _prepare_resume(run_dir: RunDir, cfg: RunConfig, step: int, trainer: Trainer) -> None:
    """Rank 0: tidy the folder before any rank trains, and check the space."""
    run_dir.clean_temporary()
    try:
        run_dir.truncate_metrics(step)
        run_dir.write_config(to_toml(cfg))
    except WriteFailed as exc:
        raise WriteFailed(f"{exc}; the run's checkpoints are unchanged: free some space, then resume again",
                          exc.path) from None
    existing = sum(p.stat().st_size for p in (run_dir.latest, run_dir / "best.pt", *run_dir.step_files())
                   if p.exists())
    _warn_disk(trainer, existing)


def _raise(error: CharLMError | None) -> None:
    if error is not None:
        raise error


def _device_available(name: str) -> bool:
    try:
        resolve_device(name)
    except CharLMError:
        return False
    return True


def _budget(trainer: Trainer, time_cap: float | None, max_steps: int | None, clock: Clock) -> TimeBudget:
    """The trainer's budget; an evaluation's cost is estimated until one is measured."""
    val = len(trainer.split.val)
    guess = guess_eval_seconds(min(val, trainer.cfg.train.eval_chars or val), trainer.batcher.chars_per_batch)
    return TimeBudget(trainer.plan, time_cap, max_steps, trainer.cfg.session.eval_interval, guess, clock)


class _StartOnly(Callbacks):
    """What a rank other than 0 reports: only that training started (so a caller can arm its
    signal handlers there too); progress is rank 0's to show."""

    def __init__(self, inner: Callbacks) -> None:
        self.inner = inner

    def on_start(self, info: StartInfo) -> None:
        self.inner.on_start(info)


def _for_rank(callbacks: Callbacks, d: Dist) -> Callbacks:
    return callbacks if d.is_main else _StartOnly(callbacks)


def corpus_note(corpus: EncodedCorpus) -> str:
    """One line on where the encoded corpus came from."""
    what = (f"corpus: {corpus.desc['chars']:,} characters, {len(corpus.vocab)} distinct, "
            f"{corpus.ids.dtype.name} ids")
    if corpus.encoded:
        rate = corpus.desc["chars"] / max(corpus.seconds, 1e-9) / 1e6
        return f"{what}, encoded in {corpus.seconds:.1f}s ({rate:,.1f} M chars/s), cached in {corpus.path.parent}"
    return f"{what}, from the cache ({corpus.path.parent})"


def start_info(trainer: Trainer, resumed: bool) -> StartInfo:
    return StartInfo(resumed=resumed, out_dir=trainer.run_dir.path, device=trainer.device.type,
                     precision=trainer.precision, params=trainer.model.num_parameters(),
                     vocab_size=len(trainer.vocab), train_chars=len(trainer.split.train),
                     val_chars=len(trainer.split.val), world_size=trainer.dist.world_size,
                     step=trainer.progress.step, total_steps=trainer.plan.total_steps, config=trainer.cfg,
                     corpus=trainer.corpus)

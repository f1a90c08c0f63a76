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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from charlm import checkpoint as ckpt_io
from charlm.budget import Clock, TimeBudget
from charlm.config import SESSION_KEYS, RunConfig, parse_duration, sectioned, to_toml
from charlm.dataset import model_vocab, training_data
from charlm.device import resolve_device
from charlm.distributed import Dist, from_env, world_size
from charlm.encode import EncodedCorpus, encode_corpus, reopen_corpus
from charlm.errors import CharLMError
from charlm.events import Callbacks, StartInfo, TrainResult
from charlm.finetune import check_shape, describe, init_record, init_weights, load_base
from charlm.options import flag
from charlm.records import RecordSet
from charlm.rundir import RunDir
from charlm.train import PendingSignal, Trainer
from charlm.vocab import Vocab


def _no_signal() -> int:
    return 0


def fit(cfg: RunConfig, specs: list[str] | None, out_dir: Path | str, *, encoding: str | None = None,
        force: bool = False, callbacks: Callbacks | None = None, pending_signal: PendingSignal = _no_signal,
        corpus: EncodedCorpus | None = None, clock: Clock = time.perf_counter) -> TrainResult:
    """Train a new model on CORPUS `specs` (None: nltk:state_union) into `out_dir`."""
    cfg.validate()
    run_dir = RunDir(out_dir)
    device = resolve_device(cfg.session.device)
    time_cap = parse_duration(cfg.session.time) if cfg.session.time else None
    d, device = from_env(device)
    try:
        # Rank 0 alone writes into --out, so its check is the one that counts; a refusal stops
        # every rank (and is printed once). No rank goes on before it is done.
        d.all_or_none(lambda: run_dir.check_new(force) if d.is_main else None)
        init_from = cfg.train.init_from
        base = d.all_or_none(lambda: _load_base(cfg, run_dir, force)) if init_from else None
        callbacks = _for_rank(callbacks or Callbacks(), d)
        if corpus is None:
            corpus = d.local_first(lambda: encode_corpus(specs, encoding, progress=callbacks.on_progress))
        callbacks.on_message(corpus_note(corpus))
        enc = corpus
        vocab = model_vocab(enc.vocab.chars, cfg.train.records, base.vocab if base is not None else "")
        data = d.all_or_none(lambda: training_data(enc, vocab, cfg.train.records))
        trainer = Trainer(cfg, vocab, data, corpus.desc, run_dir, device, d)
        if base is not None:
            init_weights(trainer.model, base, vocab)
            trainer.init = init_record(init_from, base, corpus.vocab.chars, vocab)
            callbacks.on_message("fine-tuning from " + describe(trainer.init))
        if isinstance(data, RecordSet):
            callbacks.on_message(records_note(trainer))
        if d.is_main:
            run_dir.create(force)
            run_dir.write_config(to_toml(cfg))
        callbacks.on_start(start_info(trainer, resumed=False))
        budget = _budget(trainer, time_cap, cfg.session.max_steps or None, clock)
        return trainer.loop(budget, callbacks, pending_signal)
    finally:
        d.close()


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
    ck = ckpt_io.load(path)
    # The rules give the same answer on every rank: a refusal waits until all of them are in
    # the process group, so that it is printed once.
    refusal: CharLMError | None = None
    try:
        plan = plan_resume(ck, str(path), changes or {}, config_file, world_size(), _device_available)
        device = resolve_device(plan.cfg.session.device)
    except CharLMError as exc:
        refusal, device = exc, torch.device("cpu")
    d, device = from_env(device)
    try:
        d.all_or_none(lambda: _raise(refusal))
        callbacks = _for_rank(callbacks or Callbacks(), d)
        corpus = d.local_first(lambda: reopen_corpus(ck.corpus, path, ck.vocab, progress=callbacks.on_progress))
        run_dir = RunDir(path.parent)
        vocab = Vocab(ck.vocab)  # the corpus's, merged with a fine-tuned run's base and markers
        data = training_data(corpus, vocab, plan.cfg.train.records)
        trainer = Trainer(plan.cfg, vocab, data, ck.corpus, run_dir, device, d)
        trainer.load(ck)
        budget = _budget(trainer, plan.time_cap, plan.max_steps, clock)
        if plan.max_steps is not None:
            budget.fix(plan.max_steps)
        elif plan.extend_by_time:
            assert plan.time_cap is not None
            budget.fix(budget.steps_for(plan.time_cap, ck.progress.step))
        if d.is_main:
            run_dir.clean_temporary()
            run_dir.truncate_metrics(ck.progress.step)
            run_dir.write_config(to_toml(plan.cfg))
        d.barrier()  # rank 0 has tidied the folder before any rank trains
        callbacks.on_start(start_info(trainer, resumed=True))
        for note in plan.notes:
            callbacks.on_message(note)
        return trainer.loop(budget, callbacks, pending_signal)
    finally:
        d.close()


def _load_base(cfg: RunConfig, run_dir: RunDir, force: bool) -> ckpt_io.Checkpoint:
    """The --init-from checkpoint, checked: safe to load, its shape the run's, and not a file
    that --force is about to delete."""
    path = Path(cfg.train.init_from)
    if force and path.resolve().parent == run_dir.path.resolve() and path.exists():
        raise CharLMError(f"--init-from {path} is a file of the --out folder, which --force clears; "
                          "copy it elsewhere first")
    base = load_base(path)
    check_shape(cfg.model, base, path)
    return base


def records_note(trainer: Trainer) -> str:
    """One line on the records a run trains on (and how long ones are read)."""
    train, val = trainer.split.train, trainer.split.val
    assert isinstance(train, RecordSet) and isinstance(val, RecordSet)
    longest = int(max(train.lengths.max(), val.lengths.max()))
    text = (f"records ({train.mode}): {train.count:,} training, {val.count:,} held out; "
            f"longest {longest:,} characters")
    seq_len = trainer.cfg.train.seq_len
    long = int((train.lengths + 1 > seq_len).sum())
    if long:
        text += (f"; {long:,} training records are longer than --seq-len {seq_len}: each is read in "
                 "pieces of that length, its state carried from piece to piece")
    return text


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
    val, chars_per_batch = len(trainer.split.val), trainer.batcher.chars_per_batch
    scored = min(val, trainer.cfg.train.eval_chars or val)

    def eval_guess(sec_per_step: float) -> float:
        # A forward pass costs about a third of forward + backward.
        return scored * sec_per_step / chars_per_batch / 3

    return TimeBudget(trainer.plan, time_cap, max_steps, trainer.cfg.session.eval_interval, eval_guess, clock)


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

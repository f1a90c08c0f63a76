"""Training sessions: start a new run in a folder (`fit`) or continue one (`resume`).

A session validates everything (config, device, corpus, output folder, memory) before its
first write, prepares the run folder, builds a `Trainer`, plans its budget and runs its
loop. It reports through `Callbacks` and stops cleanly when `pending_signal()` returns a
signal number: the step finishes, `latest.pt` is saved, and `TrainingInterrupted` is raised.
What a resume may change is `charlm.training.resuming`'s; what is checked around the writes
(the lock, the disk), `charlm.training.preflight`'s; the memory a run needs, `charlm.training.memory`'s.
With `--tensorboard`, the events are `charlm.training.tensorboard_log`'s.

Launched by torchrun, every process calls these functions; they train one model together,
and rank 0 alone reports and writes files. Bad input that one rank finds stops every rank.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from charlm.config.run import RunConfig, to_toml
from charlm.data.cache import EncodedCorpus, encode_corpus, reopen_corpus
from charlm.data.records import RecordSplit
from charlm.data.streams import model_vocab, training_data
from charlm.data.vocab import Vocab
from charlm.device import resolve_device, resolve_precision
from charlm.errors import CharLMError
from charlm.storage import checkpoint as ckpt_io
from charlm.storage.checkpoint import BudgetState
from charlm.storage.rundir import RunDir
from charlm.training import memory, preflight, tensorboard_log
from charlm.training.budget import Clock, TimeBudget, guess_eval_seconds
from charlm.training.distributed import Dist, env_rank, from_env, world_size
from charlm.training.events import Callbacks, EvalRecord, Fanout, StartInfo, TrainResult
from charlm.training.finetune import SHAPE, adopt, describe, init_record, init_weights, load_base
from charlm.training.planner import Plan
from charlm.training.probe import plan_run, remember_speed
from charlm.training.resuming import resume_settings
from charlm.training.trainer import PendingSignal, Trainer


def _no_signal() -> int:
    return 0


def fit(cfg: RunConfig, specs: list[str] | None, out_dir: Path | str, *, encoding: str | None = None,
        force: bool = False, callbacks: Callbacks | None = None, pending_signal: PendingSignal = _no_signal,
        corpus: EncodedCorpus | None = None, clock: Clock = time.perf_counter,
        explicit: set[str] | None = None, planner: bool | None = None) -> TrainResult:
    """Train a new model on CORPUS `specs` (None: nltk:state_union) into `out_dir`.

    `explicit` names the settings the user chose (a flag or the --config file). With it, the
    planner fills in every other model and recipe setting for this corpus, budget and machine
    (`charlm.training.planner`; `planner=False` keeps `cfg` as it is); without it, `cfg` is
    used as it is. With `cfg.train.init_from`, the run starts from that checkpoint's weights
    and takes its model settings, except the ones chosen (`charlm.training.finetune`)."""
    cfg.validate()
    tensorboard_log.require(cfg.session.tensorboard)  # before the lock: a refusal leaves --out untouched
    use_planner = explicit is not None if planner is None else planner
    run_dir = RunDir(out_dir)
    lock = run_dir.lock(label=f"--out {run_dir.path}")
    device = resolve_device(cfg.session.device)
    resolve_precision(cfg.session.precision, device)  # a precision this machine lacks is refused now
    d, device = from_env(device)
    trainer: Trainer | None = None
    board = _board(cfg, run_dir, d)
    try:
        # Rank 0 alone writes into --out, so its check is the one that counts; a refusal stops
        # every rank (and is printed once). No rank goes on before it is done.
        d.all_or_none(lambda: preflight.lock_new(lock, run_dir, force) if d.is_main else None)
        base = None
        if cfg.train.init_from:
            base, cfg = d.all_or_none(lambda: _start_from(cfg, run_dir, force, explicit))
        callbacks = _for_rank(callbacks or Callbacks(), d, board)
        if corpus is None:
            corpus = d.local_first(lambda: encode_corpus(specs, encoding, progress=callbacks.on_progress))
        callbacks.on_message(corpus_note(corpus))
        enc = corpus
        vocab = model_vocab(enc.vocab.chars, cfg.train.records, base.vocab if base is not None else "")
        data = d.all_or_none(lambda: training_data(enc, vocab, cfg.train.records))
        plan: Plan | None = None
        planning = 0.0  # seconds the planner's probe took: they are part of the budget
        if use_planner:
            started = clock()
            # Before the planner's probe, which trains the shapes it tries: the settings the
            # user chose may already be impossible. A fine-tuned run's shape is its base's.
            chosen = (explicit or set()) | (set(SHAPE) if base else set())
            need = memory.require(cfg, len(vocab), device, d, resumed=False)
            with memory.out_of_memory_as_error(need, cfg, device, resumed=False):
                cfg, plan = plan_run(cfg, chosen, data, len(vocab), device, d, fine_tuning=base is not None)
            callbacks.on_message(plan.summary())
            planning = clock() - started
        need = memory.require(cfg, len(vocab), device, d, resumed=False)
        with memory.out_of_memory_as_error(need, cfg, device, resumed=False):
            init = init_record(cfg.train.init_from, base, corpus.vocab.chars, vocab) if base is not None else None
            trainer = Trainer(cfg, vocab, data, corpus.desc, run_dir, device, d,
                              planner=plan.record() if plan is not None else None, init=init,
                              weights=(lambda model: init_weights(model, base, vocab)) if base is not None else None)
            if init is not None:
                callbacks.on_message("fine-tuning from " + describe(init))
            if isinstance(trainer.split, RecordSplit):
                callbacks.on_message(records_note(trainer.split, cfg.train.seq_len))
            config = to_toml(cfg) + (plan.toml_comment() if plan is not None else "")
            made = trainer
            d.all_or_none(lambda: preflight.prepare_new(run_dir, config, force, made) if d.is_main else None)
            budget = _budget(trainer, BudgetState(), cfg.session.time_seconds(), cfg.session.max_steps or None,
                             clock, spent=planning)
            budget.spend("planning", planning)
            callbacks.on_start(start_info(trainer, budget, resumed=False))
            return _remembered(trainer.loop(budget, callbacks, pending_signal), trainer, budget)
    finally:
        _close(board)
        _let_go(trainer, d)
        lock.release()
        d.close()


def dry_plan(cfg: RunConfig, specs: list[str] | None, explicit: set[str], *, encoding: str | None = None,
             callbacks: Callbacks | None = None) -> tuple[RunConfig, Plan]:
    """What `fit` would train, without training: the plan and the config it gives."""
    cfg.validate()
    callbacks = callbacks or Callbacks()
    base = None
    if cfg.train.init_from:
        base, cfg = _start_from(cfg, None, False, explicit)
    corpus = encode_corpus(specs, encoding, progress=callbacks.on_progress)
    callbacks.on_message(corpus_note(corpus))
    vocab = model_vocab(corpus.vocab.chars, cfg.train.records, base.vocab if base is not None else "")
    data = training_data(corpus, vocab, cfg.train.records)
    chosen = explicit | (set(SHAPE) if base else set())
    return plan_run(cfg, chosen, data, len(vocab), resolve_device(cfg.session.device), fine_tuning=base is not None)


def resume(path: Path | str, changes: dict[str, Any] | None = None, *, config_file: dict[str, Any] | None = None,
           callbacks: Callbacks | None = None, pending_signal: PendingSignal = _no_signal,
           clock: Clock = time.perf_counter) -> TrainResult:
    """Continue the run that wrote checkpoint `path`, in the checkpoint's folder (see
    `charlm.training.resuming.resume_settings` for what `changes` and `config_file` may hold)."""
    path = Path(path)
    run_dir = RunDir(path.parent)
    lock = run_dir.lock()
    try:
        # Rank 0 takes the run's lock before it reads the checkpoint: a writer that finished a
        # moment ago has saved its last file, and one still running refuses this resume.
        refusal: CharLMError | None = preflight.try_lock(lock) if env_rank() == 0 else None
        ck = ckpt_io.load(path)
        stamp = preflight.stamp(path)
        # The rules give the same answer on every rank: a refusal waits until all of them are
        # in the process group, so that it is printed once.
        try:
            rules = resume_settings(ck, str(path), changes or {}, config_file, world_size(), _device_available)
            device = resolve_device(rules.cfg.session.device)
            resolve_precision(rules.cfg.session.precision, device)
            tensorboard_log.require(rules.cfg.session.tensorboard)
        except CharLMError as exc:
            refusal, device = refusal or exc, torch.device("cpu")
        d, device = from_env(device)
        trainer: Trainer | None = None
        board: tensorboard_log.TensorBoardLog | None = None
        try:
            d.all_or_none(lambda: preflight.raise_if(refusal))
            preflight.same_checkpoint(d, stamp, path)
            board = _board(rules.cfg, run_dir, d)
            callbacks = _for_rank(callbacks or Callbacks(), d, board)
            corpus = d.local_first(lambda: reopen_corpus(ck.corpus, path, ck.vocab, progress=callbacks.on_progress))
            vocab = Vocab(ck.vocab)  # the corpus's, merged with a fine-tuned run's base and markers
            cfg = rules.cfg
            data = training_data(corpus, vocab, cfg.train.records)
            need = memory.require(cfg, len(vocab), device, d, resumed=True)
            with memory.out_of_memory_as_error(need, cfg, device, resumed=True):
                trainer = Trainer(cfg, vocab, data, ck.corpus, run_dir, device, d)
                trainer.load(ck, path)
                budget = _budget(trainer, dataclasses.replace(ck.budget), rules.time_cap, rules.max_steps, clock,
                                 spent=rules.spent)
                if rules.max_steps is not None:
                    budget.fix(rules.max_steps)
                elif rules.extend_by_time:
                    assert budget.time_cap is not None
                    budget.fix(budget.steps_for(budget.time_cap, ck.progress.step))
                made = trainer
                d.all_or_none(lambda: preflight.prepare_resume(run_dir, cfg, ck.progress.step, made)
                              if d.is_main else None)
                callbacks.on_start(start_info(trainer, budget, resumed=True))
                for note in rules.notes:
                    callbacks.on_message(note)
                return _remembered(trainer.loop(budget, callbacks, pending_signal), trainer, budget)
        finally:
            _close(board)
            _let_go(trainer, d)
            d.close()
    finally:
        lock.release()


def _start_from(cfg: RunConfig, run_dir: RunDir | None, force: bool, explicit: set[str] | None
                ) -> tuple[ckpt_io.Checkpoint, RunConfig]:
    """The --init-from checkpoint, checked (safe to load, and not a file that --force is about
    to delete), and the run's config with the checkpoint's model settings (`adopt`); without
    `explicit`, the settings that differ from the defaults count as chosen."""
    path = Path(cfg.train.init_from)
    if force and run_dir is not None and path.resolve().parent == run_dir.path.resolve() and path.exists():
        raise CharLMError(f"--init-from {path} is a file of the --out folder, which --force clears; "
                          "copy it elsewhere first")
    base = load_base(path)
    return base, adopt(cfg, base, path, explicit if explicit is not None else cfg.changed()).validate()


def records_note(split: RecordSplit, seq_len: int) -> str:
    """One line on the records a run trains on (and how long ones are read)."""
    train, val = split.train, split.val
    longest = int(max(train.lengths.max(), val.lengths.max()))
    text = (f"records ({train.mode}): {train.count:,} training, {val.count:,} held out; "
            f"longest {longest:,} characters")
    long = int((train.lengths + 1 > seq_len).sum())
    if long:
        text += (f"; {long:,} training records are longer than --seq-len {seq_len}: each is read in "
                 "pieces of that length, its state carried from piece to piece")
    return text


def _device_available(name: str) -> bool:
    try:
        resolve_device(name)
    except CharLMError:
        return False
    return True


def _budget(trainer: Trainer, state: BudgetState, time_cap: float | None, max_steps: int | None, clock: Clock,
            spent: float | None) -> TimeBudget:
    """The trainer's budget; an evaluation's cost is estimated until one is measured."""
    scored = trainer.cfg.train.scored_chars(len(trainer.split.val))
    guess = guess_eval_seconds(scored, trainer.batcher.chars_per_batch)
    return TimeBudget(state, time_cap, max_steps, trainer.cfg.session.eval_interval, guess, clock, spent=spent)


class _StartOnly(Callbacks):
    """What a rank other than 0 reports: only that training started (so a caller can arm its
    signal handlers there too); progress is rank 0's to show."""

    def __init__(self, inner: Callbacks) -> None:
        self.inner = inner

    def on_start(self, info: StartInfo) -> None:
        self.inner.on_start(info)


def _for_rank(callbacks: Callbacks, d: Dist, board: tensorboard_log.TensorBoardLog | None = None) -> Callbacks:
    if not d.is_main:
        return _StartOnly(callbacks)
    # The board first: its start (opening the event file, importing TensorBoard: about a
    # second) comes before the reporter's, so the progress bar's clock does not count it.
    return callbacks if board is None else Fanout(board, callbacks)


def _board(cfg: RunConfig, run_dir: RunDir, d: Dist) -> tensorboard_log.TensorBoardLog | None:
    """A --tensorboard session's event files, rank 0's alone (opened when training starts)."""
    return tensorboard_log.TensorBoardLog(run_dir.tensorboard) if cfg.session.tensorboard and d.is_main else None


def _close(board: tensorboard_log.TensorBoardLog | None) -> None:
    """Flush and close the event file, however the session ended."""
    if board is not None:
        board.close()


def corpus_note(corpus: EncodedCorpus) -> str:
    """One line on where the encoded corpus came from."""
    what = (f"corpus: {corpus.desc['chars']:,} characters, {len(corpus.vocab)} distinct, "
            f"{corpus.ids.dtype.name} ids")
    if corpus.encoded:
        rate = corpus.desc["chars"] / max(corpus.seconds, 1e-9) / 1e6
        return f"{what}, encoded in {corpus.seconds:.1f}s ({rate:,.1f} M chars/s), cached in {corpus.path.parent}"
    return f"{what}, from the cache ({corpus.path.parent})"


def start_info(trainer: Trainer, budget: TimeBudget, resumed: bool) -> StartInfo:
    return StartInfo(resumed=resumed, out_dir=trainer.run_dir.path, device=trainer.device.type,
                     precision=trainer.precision, params=trainer.model.num_parameters(),
                     vocab_size=len(trainer.vocab), train_chars=len(trainer.split.train),
                     val_chars=len(trainer.split.val), world_size=trainer.dist.world_size,
                     step=trainer.progress.step, total_steps=budget.total_steps, config=trainer.cfg,
                     corpus=trainer.corpus)


def _remembered(result: TrainResult, trainer: Trainer, budget: TimeBudget) -> TrainResult:
    """`result` with the run's evaluations, after the session's own speed is kept for the
    planner of the next run."""
    if trainer.dist.is_main:
        remember_speed(trainer.cfg, len(trainer.vocab), trainer.device, budget.state.sec_per_step,
                       budget.session_steps)
        result.metrics = [EvalRecord.from_row(row) for row in trainer.run_dir.evaluations()]
    return result


def _let_go(trainer: Trainer | None, d: Dist) -> None:
    """Free the DistributedDataParallel wrapper, and everything that still reaches it, before
    the process group closes: a DDP reducer destroyed after it (at interpreter exit) aborts a
    torchrun worker with SIGABRT instead of letting it exit with its code. A failed step's
    locals (its loss, whose graph DDP hooked) live on in the traceback of the exception in
    flight, so its frames are cleared too, and cycles collected."""
    exc = sys.exc_info()[1]
    if exc is not None:
        traceback.clear_frames(exc.__traceback__)
    if trainer is not None:
        trainer.release()
    if d.enabled:
        gc.collect()

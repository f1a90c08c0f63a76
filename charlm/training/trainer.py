"""The Trainer: builds a run's model, optimizer and data stream, steps, and loops.

    loop:  stop check (signal, clock)  ->  step  ->  record  ->  evaluate and save when due

Exact resume: the trainer's state (`checkpoint()`, `load()`) is the weights, optimizer, step,
every RNG state training draws from, the data position and the carried hidden state (and the
time budget's state, which the `TimeBudget` owns), so N steps + resume + M steps equals
N + M steps in one run, bit for bit on the CPU.

Under torchrun every process runs this same code on its own block of streams, with
DistributedDataParallel averaging the gradients; rank 0 evaluates, reports and writes, and
its checkpoint holds every rank's state (`charlm.storage.ranks.merge_ranks`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from charlm.config.run import RunConfig
from charlm.data.record_batch import RecordBatcher
from charlm.data.records import RecordSet, RecordSplit
from charlm.data.streams import Ids, StreamBatcher, split_data
from charlm.data.vocab import Vocab
from charlm.device import autocast_dtype, machine, resolve_precision
from charlm.errors import Diverged, TrainingInterrupted, WriteFailed
from charlm.generation.sampler import Sampler
from charlm.model.network import CharRNN, State, detach_state, state_from_list, state_to_list
from charlm.model.scoring import LN2, record_loss, score_held_out, stream_loss
from charlm.storage.checkpoint import BudgetState, Checkpoint, Progress, RankState, TrainedOn, serialize
from charlm.storage.ranks import capture_rng, merge_ranks, own_rank_state, restore_rng, weights_digest
from charlm.storage.rundir import RunDir, left_to_resume
from charlm.training import divergence
from charlm.training.budget import Tick, TimeBudget, lr_at
from charlm.training.distributed import Dist
from charlm.training.events import Callbacks, EvalRecord, StepStats, TrainResult
from charlm.training.reads import Unread, sync_interval

RANK_SEED_STRIDE = 1_000_003  # rank r draws dropout masks from seed + r * stride

# Returns the number of a signal that asks training to stop (SIGINT, SIGTERM), or 0.
PendingSignal = Callable[[], int]


class Trainer:
    """One run in one process: model, optimizer, data stream and the state a checkpoint holds."""

    def __init__(self, cfg: RunConfig, vocab: Vocab, ids: Ids | RecordSet, corpus: dict[str, Any], run_dir: RunDir,
                 device: torch.device, dist: Dist | None = None, *, planner: dict[str, Any] | None = None,
                 init: dict[str, Any] | None = None, weights: Callable[[CharRNN], None] | None = None) -> None:
        """`planner`: what the planner chose (kept in checkpoints); `init` and `weights`: where
        a fine-tuned run started, and what writes its starting weights into the new model."""
        self.cfg, self.vocab, self.corpus, self.run_dir, self.device = cfg, vocab, corpus, run_dir, device
        self.dist = d = dist or Dist()
        tc = cfg.train
        self.precision = resolve_precision(cfg.session.precision, device)
        # --batch-size streams per process: the text is cut into batch_size x world_size
        # streams, and each rank trains on its own block of them.
        mine = range(d.rank * tc.batch_size, (d.rank + 1) * tc.batch_size)
        self.split = split_data(ids, tc.val_fraction)
        self.batcher: StreamBatcher | RecordBatcher
        if isinstance(self.split, RecordSplit):  # records mode: rows of whole records (charlm.data.record_batch)
            self.batcher = RecordBatcher(self.split.train, tc.streams(d.world_size), tc.seq_len, device, rows=mine)
        else:
            self.batcher = StreamBatcher(self.split.train, tc.streams(d.world_size), tc.seq_len, device, rows=mine)
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)
        self.model = CharRNN(cfg.model, len(vocab)).to(device)
        if weights is not None:
            weights(self.model)  # before the optimizer and the average see the weights
        if d.enabled:
            # Same initial weights on every rank (same seed), different dropout masks.
            torch.manual_seed(tc.seed + RANK_SEED_STRIDE * d.rank)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tc.lr, betas=(0.9, 0.99),
            # One fused kernel for the whole update instead of a dozen ops per tensor.
            fused=device.type in ("cpu", "cuda"),
        )
        # fp16 needs loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        net: torch.nn.Module = self.model
        if d.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # Averages gradients over the ranks during backward, so every rank's optimizer
            # takes the same step and the weights stay identical.
            net = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.net = torch.compile(net) if cfg.session.compile else net
        # With --ema: an average of the weights, updated after every step, is the model that is
        # evaluated, saved as the weights and sampled from; the live weights go on training.
        self.average: CharRNN | None = copy.deepcopy(self.model) if tc.ema else None
        if self.average is not None:
            # A deep copy loses cuDNN's single weight buffer; without this every evaluation on
            # CUDA re-packs the weights (PyTorch warns "not part of single contiguous chunk").
            self.average.rnn.flatten_parameters()
        ac_dtype = autocast_dtype(self.precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=ac_dtype)) if ac_dtype else contextlib.nullcontext
        self.progress = Progress()
        self.hidden: State | None = None  # carried from batch to batch
        self.last_eval_step = -1
        self.planner = planner  # what the planner chose, kept in checkpoints
        self.init = dict(init or {})  # where a fine-tuned run started (charlm.training.finetune)
        # The checkpoint to continue from should this session fail (None: nothing saved yet).
        self.last_saved: tuple[Path, int] | None = None
        self.sync_every = sync_interval(device.type, d.enabled, self.scaler.is_enabled())
        self._unread = Unread()  # steps whose loss the host has not read yet

    # --- checkpoint state -------------------------------------------------------------------
    def checkpoint(self, budget: BudgetState) -> Checkpoint | None:
        """The whole checkpoint (with the time budget's `budget`), gathered from every rank;
        None on ranks other than 0."""
        mine = RankState(capture_rng(self.device), list(self.progress.loss_window),
                         weights_digest(self.model.state_dict()) if self.dist.enabled else None)
        # Saved in its own dtype (bf16 under autocast): a cast would break exact resume.
        hidden = [t.detach().cpu() for t in state_to_list(self.hidden)] if self.hidden is not None else []
        gathered = self.dist.gather((mine, hidden))
        if gathered is None:
            return None
        ranks, all_hidden, window = merge_ranks(gathered, self.progress.step)
        progress = Progress(**{**self.progress.__dict__, "loss_window": window, "data": self.batcher.state_dict()})
        live = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return Checkpoint(
            model={k: v.detach().cpu() for k, v in self.best_model.state_dict().items()},
            live=live if self.average is not None else None,
            config=self.cfg, vocab=self.vocab.chars, corpus=self.corpus,
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else {},
            progress=progress, budget=budget, hidden=all_hidden, ranks=ranks,
            trained_on=TrainedOn(self.device.type, self.precision, len(ranks), machine(self.device)), init=self.init,
            planner=self.planner)

    def load(self, ck: Checkpoint, path: Path | None = None) -> None:
        """Continue from `ck` (this rank's share of it), read from `path`."""
        if path is not None:
            self.last_saved = (path, ck.progress.step)
        self.model.load_state_dict(ck.live if ck.live is not None else ck.model)
        if self.average is not None:
            self.average.load_state_dict(ck.model)
        self.optimizer.load_state_dict(ck.optimizer)
        if ck.scaler and self.scaler.is_enabled():
            self.scaler.load_state_dict(ck.scaler)
        self.progress = Progress(**ck.progress.__dict__)
        self.planner = ck.planner
        self.init = dict(ck.init)
        self.batcher.load_state_dict(ck.progress.data)
        d = self.dist
        # This rank's rows of the run's hidden state, in its saved dtype (exact resume), but
        # never bf16 for an fp32 session (a bf16 run resumed on a CPU without bf16 kernels).
        rows, dtype = len(self.batcher.starts), torch.float32 if self.precision == "fp32" else None
        hidden = [t[:, rows * d.rank:rows * (d.rank + 1)].to(self.device, dtype) for t in ck.hidden]
        self.hidden = state_from_list(hidden, self.cfg.model.cell) if hidden else None
        own = own_rank_state(ck, d.rank, d.world_size)
        # RNG last: building the model drew random numbers for its initial weights.
        if own is not None:
            self.progress.loss_window = list(own.loss_window)
            restore_rng(own.rng, self.device)
        else:  # a run resumed in more processes than it had: fresh, distinct dropout streams
            self.progress.loss_window = [0.0, 0]
            torch.manual_seed(self.cfg.train.seed + RANK_SEED_STRIDE * d.rank + self.progress.step)

    def release(self) -> None:
        """Drop the DDP wrapper before the process group goes (destroyed after it, at
        interpreter exit, its reducer can abort a torchrun worker with SIGABRT)."""
        self.net = self.model

    @property
    def best_model(self) -> CharRNN:
        """The weights to evaluate, save and sample from: the average when there is one."""
        return self.average if self.average is not None else self.model

    def _update_average(self, step: int) -> None:
        """Move the average toward the live weights; early on it follows them closely (the
        decay ramps up), so the first weights, still random, fade out fast."""
        if self.average is None:
            return
        decay = min(self.cfg.train.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.average.parameters()), list(self.model.parameters()), 1 - decay)

    def save(self, budget: TimeBudget, best: bool, step_file: bool) -> list[Path]:
        """Write latest.pt (and best.pt / a step file), each atomically. Every rank calls this
        (it gathers their states); rank 0 alone writes, and a failed write stops every rank."""
        self.settle()  # no step is saved before the host has seen that it did not diverge
        # Never save weights that are not finite (the step check should have caught it).
        divergence.check_weights([self.model, self.best_model], self.progress.step, self.cfg.train.lr, self.last_good())
        t0 = budget.clock()
        budget.note()
        ck = self.checkpoint(budget.state)
        step = self.progress.step if step_file else None
        targets = self.dist.all_or_none(lambda: self._write(ck, best, step))
        self.last_saved = (targets[-1], self.progress.step)
        budget.spend("saving", budget.clock() - t0)
        return targets

    def _write(self, ck: Checkpoint | None, best: bool, step: int | None) -> list[Path]:
        if ck is None:  # not rank 0
            return self.run_dir.save_targets(best, step)
        try:
            return self.run_dir.save(serialize(ck), best, step, self.cfg.session.keep)
        except WriteFailed as exc:
            kept = left_to_resume(self.last_saved, exc.written, self.progress.step)
            raise WriteFailed(f"{exc}; training stopped at step {self.progress.step}; {kept}", exc.path) from None

    def last_good(self) -> str | None:
        return None if self.last_saved is None else f"{self.last_saved[0]} (step {self.last_saved[1]})"

    # --- training ---------------------------------------------------------------------------
    def loop(self, budget: TimeBudget, callbacks: Callbacks, pending_signal: PendingSignal) -> TrainResult:
        """Train until the planned step count, the time cap, or a stop signal."""
        p, d = self.progress, self.dist
        self.model.train()
        budget.begin()
        if budget.total_steps is not None:
            callbacks.on_plan(budget.total_steps)
        saved: list[Path] = []
        finished, early = True, False
        while budget.running(p.step) and not early:
            tick, signum = self._stop_check(budget, pending_signal, callbacks)
            if signum:
                self.settle(callbacks.on_step)
                latest = self.save(budget, best=False, step_file=False)[-1]
                d.barrier()  # the checkpoint is complete before any rank exits
                raise TrainingInterrupted(signum, str(latest), p.step)
            if tick.out_of_time:
                finished = False
                break
            self.step(budget, tick.now)
            due = p.step % self.cfg.session.eval_interval == 0 or budget.at_end(p.step)
            if due or len(self._unread) >= self.sync_every:
                self.settle(callbacks.on_step)
            if due:
                saved = self._evaluate_and_save(budget, callbacks)
                patience = self.cfg.session.patience
                early = bool(patience) and p.since_best >= patience and not budget.at_end(p.step)
        self.settle(callbacks.on_step)
        if not finished and p.step and self.last_eval_step != p.step:
            # Stopped by the clock before the plan's end: still evaluate (best.pt) and save.
            saved = self._evaluate_and_save(budget, callbacks)
        elif not saved and p.step:
            saved = self.save(budget, best=False, step_file=False)
        d.barrier()  # no rank returns (and reads a checkpoint) before rank 0 has written it
        return TrainResult(self.run_dir.path, p.step, budget.total_steps, p.chars_seen, p.elapsed,
                           p.best_val_bpc, p.last_val_bpc, finished, saved, stopped_early=early,
                           seconds=budget.breakdown())

    def _stop_check(self, budget: TimeBudget, pending_signal: PendingSignal,
                    callbacks: Callbacks) -> tuple[Tick, int]:
        """The clock's verdict and any stop signal, the same on every rank."""
        d = self.dist
        signum = pending_signal()
        # Rank 0's clock plans and stops the run; the other ranks follow it.
        tick = budget.tick(self.progress.step, plans=d.is_main)
        if d.enabled:
            # One small all-reduce per step: a signal on any rank stops them all, at the same
            # step, and rank 0's plan and clock hold for every rank.
            planned = -1 if budget.total_steps is None or not d.is_main else budget.total_steps
            signum, late, planned, fixed = d.all_max(
                [signum, int(tick.out_of_time), planned, int(budget.state.steps_fixed and d.is_main)])
            tick.out_of_time = bool(late)
            budget.follow(None if planned < 0 else planned, bool(fixed))
        if tick.replanned and budget.total_steps is not None:
            callbacks.on_plan(budget.total_steps)
        return tick, signum

    def step(self, budget: TimeBudget, started: float) -> None:
        """One optimizer step on the next batch (`started`: the budget's clock when the step's
        turn began, so the stop check is counted as training time). Its loss is read on the
        host now (`sync_every` 1: a diverged step raises before the optimizer step) or at the
        next `settle` (a diverged step is skipped on the device and raises there)."""
        p, tc, clock = self.progress, self.cfg.train, budget.clock
        lr = lr_at(p.step, budget.total_steps, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t0 = clock()
        loss, hidden, batch_chars = self._forward()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        # Clip the global gradient norm: one long sequence can otherwise blow up an RNN.
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        bits = loss.detach().float() / LN2
        # Under fp16 the loss scaler owns infinite gradients: it skips such steps by design.
        limit = divergence.loss_limit(len(self.vocab), p.last_val_bpc)
        code = divergence.verdict(bits, None if self.scaler.is_enabled() else norm.detach(), limit)
        if self.sync_every == 1:  # before the optimizer step: a diverged step must never reach the weights
            self._stop_if(p.step + 1, *divergence.agreed(self.dist, int(code), float(bits)))
        else:  # the fused optimizer skips the step on the device if it diverged (no host read)
            self.optimizer.found_inf = (code != divergence.FINE).float()  # type: ignore[attr-defined]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._update_average(p.step)
        # Keep the values (context) but cut the graph: truncated BPTT over seq_len steps.
        self.hidden = detach_state(hidden)
        dt = clock() - t0
        # Records batches vary: each process counts its own (an estimate under torchrun).
        chars = batch_chars * self.dist.world_size
        p.step += 1
        p.chars_seen += chars
        budget.stepped()
        stats = StepStats(p.step, budget.total_steps, math.nan, lr, chars / dt if dt > 0 else 0.0,
                          clock() - budget.start, budget.time_cap, p.chars_seen)
        self._unread.add(stats, bits, code)
        p.elapsed += clock() - started

    def settle(self, tell: Callable[[StepStats], None] | None = None) -> None:
        """Read the pending steps' losses and verdicts on the host (one wait for the device),
        in order: count each one's loss toward the next evaluation's training bpc and `tell`
        its stats, bpc filled in, until one that diverged, which raises `Diverged`."""
        p = self.progress
        for stats, bits, code in self._unread.read():
            self._stop_if(stats.step, code, bits)
            p.loss_window = [p.loss_window[0] + bits, p.loss_window[1] + 1]
            if tell is not None:
                tell(replace(stats, bpc=bits))

    def _stop_if(self, step: int, code: int, bpc: float) -> None:
        """Raise `Diverged` at `step` unless its verdict is FINE (`charlm.training.divergence`)."""
        if code != divergence.FINE:
            what = divergence.describe(code, bpc, divergence.loss_limit(len(self.vocab), self.progress.last_val_bpc))
            raise Diverged(divergence.message(step, what, self.cfg.train.lr, self.last_good()), step)

    def _forward(self) -> tuple[torch.Tensor, State, int]:
        """The next batch's mean loss (nats), the state it leaves, and its characters."""
        if isinstance(self.batcher, RecordBatcher):
            batch = self.batcher.next()
            if self.hidden is None:
                self.hidden = self.model.init_state(len(self.batcher.starts), self.device)
            with self.autocast():
                loss, hidden = record_loss(self.net, batch, self.hidden)
            return loss, hidden, batch.chars
        x, y, reset = self.batcher.next()  # (B, T) each
        if reset or self.hidden is None:
            self.hidden = self.model.init_state(x.shape[0], self.device)
        with self.autocast():
            loss, hidden = stream_loss(self.net, x, y, self.hidden)
        return loss, hidden, x.numel()

    def _evaluate_and_save(self, budget: TimeBudget, callbacks: Callbacks) -> list[Path]:
        """Score the held-out text, save the checkpoints, log a metrics line, show previews."""
        p, d = self.progress, self.dist
        t0, saving = budget.clock(), budget.split["saving"]
        windows = d.gather(p.loss_window) or []
        val_bpc = 0.0
        if d.is_main:  # the others wait for the result (rank 0 scores the held-out text)
            # In the run's precision: on a CPU with AMX, bf16 scores 3-4x faster than fp32 (the
            # evaluations took a fifth of a 4-minute run) and within 2e-4 bpc of it.
            with self.autocast():
                val_bpc, _ = score_held_out(self.best_model, self.split, self.device, self.cfg.train.eval_chars)
        val_bpc = d.broadcast(val_bpc)
        if not math.isfinite(val_bpc):
            raise Diverged(divergence.message(p.step, "the validation loss is not a number", self.cfg.train.lr,
                                              self.last_good()), p.step)
        self.last_eval_step = p.step
        improved = p.best_val_bpc is None or val_bpc < p.best_val_bpc
        p.since_best = 0 if improved else p.since_best + 1
        if improved:
            p.best_val_bpc = val_bpc
        p.last_val_bpc = val_bpc
        record = EvalRecord(
            step=p.step, chars=p.chars_seen,
            # Mean over every rank's batches since the last evaluation.
            train_bpc=sum(w[0] for w in windows) / max(1, sum(w[1] for w in windows)),
            val_bpc=val_bpc, lr=lr_at(p.step - 1, budget.total_steps, self.cfg.train),
            elapsed=round(p.elapsed, 3))
        p.loss_window = [0.0, 0]
        saved = self.save(budget, best=improved, step_file=True)
        # Metrics after the checkpoint: a crash in between loses a line, never invents one.
        d.all_or_none(lambda: self._append_metrics(record) if d.is_main else None)
        if not d.is_main:
            return saved
        callbacks.on_eval(record, self.previews())
        # What an evaluation costs the time budget: scoring, saving (fsync) and previews.
        took = budget.clock() - t0
        budget.evaluated(took)
        budget.spend("evaluation", took - (budget.split["saving"] - saving))
        return saved

    def _append_metrics(self, record: EvalRecord) -> None:
        try:
            self.run_dir.append_metrics(record.__dict__)
        except WriteFailed as exc:
            raise WriteFailed(f"{exc}; training stopped at step {self.progress.step}, whose checkpoint was "
                              f"saved: free some space, then `charlm resume {self.run_dir.latest}`", exc.path) from None

    def previews(self) -> list[tuple[float, str]]:
        """Short samples at a few temperatures (`Sampler.previews`), none when turned off."""
        n = self.cfg.session.preview_length  # (the sampler leaves the model in the mode it found)
        return Sampler(self.best_model, self.vocab, self.device).previews(n, self.progress.step,
                                                                          self.cfg.train.records) if n > 0 else []

"""The training loop: state carry, clipping, schedule, evaluation, checkpoint cadence.

`start` begins a run in an output folder and `resume` continues one from a checkpoint.
Both report progress through a `Callbacks` object (the CLI draws it; the library itself
never prints) and stop cleanly when `should_stop()` returns a signal number: the current
step finishes, `latest.pt` is saved, and `TrainingInterrupted` is raised.

Exact resume: a checkpoint holds weights, optimizer, step, the planned step count, every
RNG state training uses, the data position and the carried hidden state, so N steps +
resume + M steps equals N + M steps in one run, bit for bit on the CPU.

Under torchrun every process runs this same code on its own block of streams, with
DistributedDataParallel averaging the gradients (`charlm.distributed`); rank 0 evaluates,
reports and writes, and its checkpoint holds every rank's state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from charlm import checkpoint as ckpt_io
from charlm.config import RunConfig, TrainConfig, parse_duration, to_toml
from charlm.encode import EncodedCorpus, encode_corpus, reopen_corpus
from charlm.data import Ids, StreamBatcher, eval_streams, split
from charlm.device import autocast_dtype, resolve_device, resolve_precision
from charlm.distributed import Dist, from_env
from charlm.errors import CharLMError, TrainingInterrupted
from charlm.model import CharRNN, State, detach_state, state_from_list, state_to_list
from charlm.schedule import lr_at
from charlm.vocab import Vocab

LN2 = math.log(2.0)
DEFAULT_MAX_STEPS = 2000  # used when neither --max-steps nor --time is given
PROBE_STEPS = 10  # a --time run measures this many steps before planning its step count
TIME_MARGIN = 0.03  # plan to finish 3 % early: timing noise must not push past the budget
PLAN_FIX_FRACTION = 0.5  # re-estimate the step count until half the budget is spent, then fix it
TIME_GRACE = 0.02  # a fixed plan may overrun its budget by 2 % to finish its schedule
PREVIEW_TEMPERATURES = (0.2, 0.5, 1.0)
RANK_SEED_STRIDE = 1_000_003  # rank r draws dropout masks from seed + r * stride
# Settings a resume may change; everything else would make it a different run.
RESUMABLE = {"max_steps", "time", "device", "eval_interval", "keep", "precision",
             "compile", "preview_length"}


class Callbacks:
    """Progress hooks; every method is optional. The CLI's reporter overrides them."""

    def on_start(self, info: dict[str, Any]) -> None: ...

    def on_plan(self, total_steps: int) -> None: ...

    def on_step(self, stats: dict[str, Any]) -> None: ...

    def on_eval(self, record: dict[str, Any], previews: list[tuple[float, str]]) -> None: ...

    def on_message(self, text: str) -> None: ...

    def on_progress(self, stage: str, done: int, total: int) -> None:
        """Reading the corpus: `stage` is "hashing" or "encoding"; bytes done of `total`
        (0 when the total is not known in advance)."""


@dataclass
class TrainResult:
    """What a training session ended with."""

    out_dir: Path
    step: int
    total_steps: int | None
    chars_seen: int
    elapsed: float
    best_val_bpc: float | None
    last_val_bpc: float | None
    finished: bool  # False when a --time cap paused the run before its planned end
    checkpoints: list[Path] = field(default_factory=list)
    plot: Path | None = None  # loss.png, when the CLI drew one


StopCheck = Callable[[], int]


def _never() -> int:
    return 0


def evaluate(model: CharRNN, ids: Ids, device: torch.device, chunk: int = 1024,
             max_chars: int | None = None) -> tuple[float, int]:
    """Bits per character of `ids` (fp32, no autograd, dropout off) and how many were scored;
    `max_chars` caps the characters scored (rows spread over all of `ids`)."""
    rows = eval_streams(ids, max_chars=max_chars).to(device)  # (S, L)
    was_training = model.training
    model.eval()
    total_bits = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    state: State | None = None
    with torch.inference_mode():
        for start in range(0, rows.shape[1] - 1, chunk):
            x = rows[:, start : start + chunk]
            y = rows[:, start + 1 : start + chunk + 1]
            x = x[:, : y.shape[1]]
            logits, state = model(x, state)  # (S, T, V), carried across chunks
            nats = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
            total_bits += nats.double() / LN2
            count += y.numel()
    model.train(was_training)
    return float(total_bits) / max(1, count), count


class Trainer:
    """One run: model, optimizer, data stream and all state that a checkpoint carries."""

    def __init__(self, cfg: RunConfig, vocab: Vocab, ids: Ids, corpus: dict[str, Any],
                 out_dir: Path, device: torch.device, dist: Dist | None = None) -> None:
        self.cfg = cfg
        self.dist = dist = dist or Dist()
        self.vocab = vocab
        self.corpus = corpus
        self.out_dir = out_dir
        self.device = device
        tc = cfg.train
        self.precision = resolve_precision(tc.precision, device)
        self.split = split(ids, tc.val_fraction)
        # --batch-size streams per process: the text is cut into batch_size x world_size
        # streams, and each rank trains on its own block of them.
        mine = range(dist.rank * tc.batch_size, (dist.rank + 1) * tc.batch_size)
        self.batcher = StreamBatcher(self.split.train, tc.batch_size * dist.world_size, tc.seq_len,
                                     device, rows=mine)
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)
        self.model = CharRNN(cfg.model, len(vocab)).to(device)
        if dist.enabled:
            # Same initial weights on every rank (same seed), different dropout masks.
            torch.manual_seed(tc.seed + RANK_SEED_STRIDE * dist.rank)
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
        module: torch.nn.Module = self.model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # Averages gradients over the ranks during backward, so every rank's optimizer
            # takes the same step and the weights stay identical.
            module = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.forward = torch.compile(module) if tc.compile else module
        self.step = 0
        self.total_steps: int | None = None
        self.plan_final = False
        self.chars_seen = 0
        self.elapsed = 0.0  # training seconds over all sessions
        self.sec_per_step: float | None = None
        self.eval_seconds: float | None = None
        self.best_val: float | None = None
        self.last_val: float | None = None
        self.last_eval_step = -1
        self.session_eval_seconds = 0.0
        self.loss_sum = 0.0  # train bits since the last evaluation (for the metrics line)
        self.loss_count = 0
        self.state: State | None = None

    # --- checkpoint state -------------------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        """What differs between ranks: RNG, carried hidden state, loss window, a weight digest."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        # Saved in its own dtype (bf16 under autocast): a cast would break exact resume.
        hidden = [t.detach().cpu() for t in state_to_list(self.state)] if self.state is not None else []
        mine: dict[str, Any] = {"rng": rng, "hidden": hidden, "loss_window": [self.loss_sum, self.loss_count]}
        if self.dist.enabled:
            digest = hashlib.sha256()
            for t in self.model.state_dict().values():
                digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            mine["weights_sha256"] = digest.hexdigest()
        return mine

    def state_dict(self) -> dict[str, Any] | None:
        """The whole checkpoint (gathered from every rank); None on ranks other than 0."""
        ranks = self.dist.gather(self._rank_state())
        if ranks is None:
            return None
        digests = {r.get("weights_sha256") for r in ranks}
        if len(digests) > 1:
            raise CharLMError(f"the {len(ranks)} processes' weights differ at step {self.step}; "
                              "not saving a checkpoint that only one of them would match")
        # One hidden state for all streams: rank r's rows follow rank r-1's, as in the data.
        hidden = ([torch.cat(parts, dim=1) for parts in zip(*(r["hidden"] for r in ranks))]
                  if all(r["hidden"] for r in ranks) else [])
        world = len(ranks)
        # The loss window as one process would hold it: mean over ranks, rank 0's count.
        window = [sum(r["loss_window"][0] for r in ranks) / world, ranks[0]["loss_window"][1]]
        extra: dict[str, Any] = {}
        if world > 1:
            extra["ranks"] = [{k: v for k, v in r.items() if k != "hidden"} for r in ranks]
        return {
            "format": ckpt_io.FORMAT,
            "version": ckpt_io.VERSION,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "config": self.cfg.to_dict(),
            "vocab": self.vocab.chars,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "step": self.step,
            "total_steps": self.total_steps,
            "plan_final": self.plan_final,
            "chars_seen": self.chars_seen,
            "elapsed": self.elapsed,
            "sec_per_step": self.sec_per_step,
            "eval_seconds": self.eval_seconds,
            "best_val_bpc": self.best_val,
            "last_val_bpc": self.last_val,
            "loss_window": window,
            "rng": ranks[0]["rng"],
            "data": self.batcher.state_dict(),
            "hidden": hidden,
            "corpus": self.corpus,
            "device": self.device.type,
            "precision": self.precision,
            "world_size": world,
            **extra,
        }

    def load_state_dict(self, ck: dict[str, Any]) -> None:
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if ck.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ck["scaler"])
        self.step = int(ck["step"])
        self.total_steps = ck.get("total_steps")
        self.plan_final = bool(ck.get("plan_final", False))
        self.chars_seen = int(ck.get("chars_seen", 0))
        self.elapsed = float(ck.get("elapsed", 0.0))
        self.sec_per_step = ck.get("sec_per_step")
        self.eval_seconds = ck.get("eval_seconds")
        self.best_val = ck.get("best_val_bpc")
        self.last_val = ck.get("last_val_bpc")
        self.batcher.load_state_dict(ck["data"])
        d = self.dist
        # This rank's rows of the run's hidden state (all of it in a single process).
        rows = slice(int(self.batcher.starts.shape[0]) * d.rank, int(self.batcher.starts.shape[0]) * (d.rank + 1))
        hidden = [t[:, rows].to(self.device) for t in ck.get("hidden") or []]
        self.state = state_from_list(hidden, self.cfg.model.cell) if hidden else None
        ranks = ck.get("ranks") or []
        if len(ranks) == d.world_size > 1:  # same number of processes: each its own state
            own = ranks[d.rank]
            rng, (self.loss_sum, self.loss_count) = own["rng"], own["loss_window"]
        elif d.is_main:
            rng, (self.loss_sum, self.loss_count) = ck["rng"], ck.get("loss_window", [0.0, 0])
        else:  # a run resumed in more processes than it had: fresh, distinct dropout streams
            rng, self.loss_sum, self.loss_count = None, 0.0, 0
            torch.manual_seed(self.cfg.train.seed + RANK_SEED_STRIDE * d.rank + self.step)
        # RNG last: building the model above drew random numbers for its initial weights.
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            random.setstate(_as_tuple(rng["python"]))
            if self.device.type == "cuda" and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], self.device)

    def save(self, best: bool, step_file: bool) -> list[Path]:
        """Write latest.pt (and best.pt / step-N.pt); each write is atomic. Every rank calls
        this (it gathers their states); rank 0 alone writes."""
        state = self.state_dict()
        targets = []
        if best:
            targets.append(self.out_dir / "best.pt")
        if step_file and self.cfg.train.keep > 0:
            targets.append(self.out_dir / f"step-{self.step:07d}.pt")
        # latest.pt last: a kill between files leaves latest.pt at the previous save, so the
        # resumed run redoes this step exactly and rewrites the others; the other way round
        # latest.pt would claim a best val that best.pt never received.
        targets.append(self.out_dir / "latest.pt")
        if state is None:
            return targets
        data = ckpt_io.serialize(state)
        for path in targets:
            ckpt_io.write_atomic(path, data)
        if step_file:
            # Older step files go only after the new one is safely on disk.
            ckpt_io.prune_steps(self.out_dir, self.cfg.train.keep)
        return targets

    # --- training ---------------------------------------------------------------------------
    def _plan(self, remaining: float) -> int:
        """Steps that fit in `remaining` seconds at the measured speed, evaluations included."""
        assert self.sec_per_step is not None
        tc = self.cfg.train
        eval_s = self.eval_seconds
        if eval_s is None:
            # Not measured yet: a forward pass costs about a third of forward + backward.
            scored = min(len(self.split.val), tc.eval_chars or len(self.split.val))
            eval_s = scored * self.sec_per_step / self.batcher.chars_per_batch / 3
        per_step = self.sec_per_step + eval_s / tc.eval_interval
        steps = int(max(0.0, remaining * (1 - TIME_MARGIN) - eval_s) / per_step)
        return self.step + max(1, steps)

    def _replan(self, time_cap: float, session_start: float, max_steps: int | None,
                callbacks: Callbacks) -> None:
        """Re-estimate the step count from the measured speed; fix it at half the budget.

        Until then the schedule's length follows the measurements (the cosine moves only a
        little); from then on it is fixed, stored in checkpoints, and resumes exactly.
        """
        used = time.perf_counter() - session_start
        plan = self._plan(time_cap - used)
        total = min(plan, max_steps) if max_steps else plan
        if total != self.total_steps:
            self.total_steps = total
            callbacks.on_plan(total)
        if used >= time_cap * PLAN_FIX_FRACTION:
            self.plan_final = True

    def fit(self, time_cap: float | None, max_steps: int | None, callbacks: Callbacks,
            should_stop: StopCheck) -> TrainResult:
        """Train until the planned step count, the time cap, or a stop signal."""
        tc = self.cfg.train
        session_start = time.perf_counter()
        self.model.train()
        ac_dtype = autocast_dtype(self.precision)
        autocast = (torch.autocast(self.device.type, dtype=ac_dtype) if ac_dtype is not None
                    else contextlib.nullcontext())
        if self.total_steps is None and time_cap is None:
            self.total_steps = max_steps or DEFAULT_MAX_STEPS
            self.plan_final = True
        if self.total_steps is not None:
            callbacks.on_plan(self.total_steps)
        mark: tuple[float, float] | None = None  # (clock, evaluation seconds) after warm-up
        self.session_eval_seconds = 0.0
        session_steps = 0
        last_saved: list[Path] = []
        finished = True
        d = self.dist
        while (self.total_steps is None or self.step < self.total_steps) and not (
                max_steps and self.step >= max_steps):
            signum = should_stop()
            now = time.perf_counter()
            # Step time from loop start to loop start (everything a step costs the budget),
            # less the evaluations, which the plan counts separately.
            if session_steps == 3:  # the first steps pay for allocation and warm-up
                mark = (now, self.session_eval_seconds)
            elif mark is not None:
                self.sec_per_step = (now - mark[0] - (self.session_eval_seconds - mark[1])) / (session_steps - 3)
            # Rank 0's clock plans and stops the run; the other ranks follow it.
            if time_cap is not None and not self.plan_final and session_steps >= PROBE_STEPS and d.is_main:
                self._replan(time_cap, session_start, max_steps, callbacks)
            limit = time_cap * (1 + TIME_GRACE) if time_cap is not None and self.plan_final else time_cap
            out_of_time = d.is_main and limit is not None and now - session_start >= limit
            if d.enabled:
                # One small all-reduce per step: a signal on any rank stops them all, at the
                # same step, and rank 0's plan and clock hold for every rank.
                planned = -1 if self.total_steps is None or not d.is_main else self.total_steps
                signum, late, planned, final = d.agree(
                    [signum, int(out_of_time), planned, int(self.plan_final and d.is_main)])
                out_of_time, self.plan_final = bool(late), bool(final)
                self.total_steps = None if planned < 0 else planned
            if signum:
                paths = self.save(best=False, step_file=False)
                d.barrier()  # the checkpoint is complete before any rank exits
                raise TrainingInterrupted(signum, str(paths[-1]), self.step)  # latest.pt
            if out_of_time:
                finished = False
                break
            x, y, reset = self.batcher.next()  # (B, T) each
            if reset or self.state is None:
                self.state = self.model.init_state(x.shape[0], self.device)
            lr = lr_at(self.step, self.total_steps, tc)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            with autocast:
                logits, state = self.forward(x, self.state)  # (B, T, V)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            # Clip the global gradient norm: one long sequence can otherwise blow up an RNN.
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # Keep the values (context) but cut the graph: truncated BPTT over seq_len steps.
            self.state = detach_state(state)
            bpc = loss.item() / LN2
            dt = time.perf_counter() - t0
            self.step += 1
            session_steps += 1
            self.chars_seen += x.numel() * d.world_size
            self.loss_sum += bpc
            self.loss_count += 1
            callbacks.on_step({
                "step": self.step, "total": self.total_steps, "bpc": bpc, "lr": lr,
                "chars_per_s": x.numel() * d.world_size / dt if dt > 0 else 0.0,
                "elapsed": time.perf_counter() - session_start, "time_cap": time_cap,
                "chars_seen": self.chars_seen,
            })
            self.elapsed += time.perf_counter() - now
            at_end = self.total_steps is not None and self.step >= self.total_steps
            if self.step % tc.eval_interval == 0 or at_end:
                last_saved = self._evaluate_and_save(callbacks)
        if not finished and self.step and self.last_eval_step != self.step:
            # Stopped by the clock before the plan's end: still evaluate (best.pt) and save.
            last_saved = self._evaluate_and_save(callbacks)
        elif not last_saved and self.step:
            last_saved = self.save(best=False, step_file=False)
        d.barrier()  # no rank returns (and reads a checkpoint) before rank 0 has written it
        return TrainResult(self.out_dir, self.step, self.total_steps, self.chars_seen, self.elapsed,
                           self.best_val, self.last_val, finished, last_saved)

    def _evaluate_and_save(self, callbacks: Callbacks) -> list[Path]:
        """Score the held-out text, save the checkpoints, log a metrics line, show previews."""
        t0 = time.perf_counter()
        d = self.dist
        windows = d.gather((self.loss_sum, self.loss_count)) or []
        val_bpc = 0.0
        if d.is_main:  # the others wait for the result (rank 0 scores the held-out text)
            val_bpc, _ = evaluate(self.model, self.split.val, self.device, max_chars=self.cfg.train.eval_chars)
        val_bpc = d.broadcast(val_bpc)
        self.last_eval_step = self.step
        improved = self.best_val is None or val_bpc < self.best_val
        if improved:
            self.best_val = val_bpc
        self.last_val = val_bpc
        record = {
            "step": self.step,
            "chars": self.chars_seen,
            # Mean over every rank's batches since the last evaluation.
            "train_bpc": sum(w[0] for w in windows) / max(1, sum(w[1] for w in windows)),
            "val_bpc": val_bpc,
            "lr": lr_at(self.step - 1, self.total_steps, self.cfg.train),
            "elapsed": round(self.elapsed, 3),
        }
        self.loss_sum, self.loss_count = 0.0, 0
        saved = self.save(best=improved, step_file=True)
        if not d.is_main:
            return saved
        # Metrics after the checkpoint: a crash in between loses a line, never invents one.
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        previews = self.previews()
        callbacks.on_eval(record, previews)
        # What an evaluation costs the time budget: scoring, saving (fsync) and previews.
        self.eval_seconds = time.perf_counter() - t0
        self.session_eval_seconds += self.eval_seconds
        return saved

    def previews(self) -> list[tuple[float, str]]:
        """Short samples at a few temperatures; their own RNG leaves training untouched."""
        n = self.cfg.train.preview_length
        if n <= 0:
            return []
        from charlm.sample import Sampler

        sampler = Sampler(self.model, self.vocab, self.device)
        out = []
        for t in PREVIEW_TEMPERATURES:
            text = "".join(sampler.generate(length=n, temperature=t, seed=self.step))
            out.append((t, text))
        self.model.train()
        return out


def _as_tuple(value: Any) -> Any:
    """Python's RNG state comes back from a checkpoint with lists where tuples were."""
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value


# --- entry points ---------------------------------------------------------------------------


def existing_run(out_dir: Path) -> Path | None:
    """The first file showing that `out_dir` already holds a run, if any."""
    for name in ckpt_io.RUN_FILES:
        if (out_dir / name).exists():
            return out_dir / name
    steps = ckpt_io.step_files(out_dir) if out_dir.is_dir() else []
    return steps[0] if steps else None


def prepare_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse (or, with force, clear) a folder that holds a run; never touches other files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CharLMError(f"--out {out_dir}: exists and is not a folder")
    found = existing_run(out_dir)
    if found is not None and not force:
        raise CharLMError(
            f"--out {out_dir}: already holds a run ({found.name}); continue it with "
            f"`charlm resume {out_dir / 'latest.pt'}`, or pass --force to start over, "
            f"or choose another --out"
        )


def _clear_run(out_dir: Path) -> None:
    for name in (*ckpt_io.RUN_FILES, "loss.png"):
        (out_dir / name).unlink(missing_ok=True)
    for p in ckpt_io.step_files(out_dir):
        p.unlink(missing_ok=True)


def start(cfg: RunConfig, specs: list[str] | None, out_dir: Path, *, encoding: str | None = None,
          force: bool = False, callbacks: Callbacks | None = None,
          should_stop: StopCheck = _never, corpus: EncodedCorpus | None = None) -> TrainResult:
    """Train a new model on CORPUS specs into `out_dir`.

    Everything is validated (config, device, corpus, output folder) before the first write.
    Launched by torchrun, every process calls this; they train one model together with
    DistributedDataParallel, and rank 0 alone reports (`callbacks`) and writes files.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    device = resolve_device(cfg.train.device)
    time_cap = parse_duration(cfg.train.time) if cfg.train.time else None
    d, device = from_env(device)
    try:
        # Rank 0 alone writes into --out, so its check is the one that counts; a refusal
        # stops every rank (and is printed once). No rank goes on before it is done.
        d.checked(lambda: prepare_out_dir(out_dir, force) if d.is_main else None)
        callbacks = _for_rank(callbacks or Callbacks(), d)
        if corpus is None:
            corpus = d.local_first(lambda: encode_corpus(specs, encoding, progress=callbacks.on_progress))
        callbacks.on_message(corpus_note(corpus))
        trainer = Trainer(cfg, corpus.vocab, corpus.ids, corpus.desc, out_dir, device, d)
        if d.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            ckpt_io.clean_temporary(out_dir)
            if force:
                _clear_run(out_dir)
            ckpt_io.write_atomic(out_dir / "config.toml", to_toml(cfg).encode("utf-8"))
        callbacks.on_start(_info(trainer, resumed=False))
        return trainer.fit(time_cap, cfg.train.max_steps or None, callbacks, should_stop)
    finally:
        d.close()


class _StartOnly(Callbacks):
    """What a rank other than 0 reports: only that training started (so a caller can arm its
    signal handlers there too); progress is rank 0's to show."""

    def __init__(self, inner: Callbacks) -> None:
        self.inner = inner

    def on_start(self, info: dict[str, Any]) -> None:
        self.inner.on_start(info)


def _for_rank(callbacks: Callbacks, d: Dist) -> Callbacks:
    return callbacks if d.is_main else _StartOnly(callbacks)


def resume(path: Path, overrides: dict[str, Any] | None = None, *, config_file: dict[str, Any] | None = None,
           callbacks: Callbacks | None = None, should_stop: StopCheck = _never) -> TrainResult:
    """Continue the run that wrote checkpoint `path`, in the checkpoint's folder.

    `overrides` may change only budgets, device, precision and evaluation/checkpoint
    cadence (`RESUMABLE`); `config_file` (a parsed --config) may repeat the run's other
    settings but not change them. Anything else raises `CharLMError` naming the setting.
    """
    path = Path(path)
    ck = ckpt_io.load(path)
    cfg = RunConfig.from_dict(ck["config"], origin=str(path))
    _check_changes(cfg, config_file or {}, "--config")
    # Budgets and cadence may come from the --config file too; flags win over it.
    from_file = {k: v for k, v in (config_file or {}).get("train", {}).items() if k in RESUMABLE}
    changes = {**from_file, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    for key, value in changes.items():
        if key not in RESUMABLE:
            raise CharLMError(f"--{key.replace('_', '-')}: cannot be changed on resume")
        setattr(cfg.train, key, value)
    cfg.validate()
    notes = []
    if "device" not in changes and cfg.train.device != "auto":
        try:
            resolve_device(cfg.train.device)
        except CharLMError:
            # Trained on a GPU, resumed where there is none: continue on what is here.
            notes.append(f"the run was trained with --device {cfg.train.device}, which is not "
                         "available here; continuing with --device auto")
            cfg.train.device = "auto"
    device = resolve_device(cfg.train.device)
    time_cap = parse_duration(cfg.train.time) if "time" in changes else None
    if ck.get("total_steps") is None and time_cap is None and cfg.train.time and "max_steps" not in changes:
        # A --time run stopped before it fixed its step count: finish its original budget.
        time_cap = max(1.0, parse_duration(cfg.train.time) - float(ck.get("elapsed", 0.0)))

    d, device = from_env(device)
    try:
        callbacks = _for_rank(callbacks or Callbacks(), d)
        return _resume(ck, path, cfg, d, device, changes, time_cap, notes, callbacks, should_stop)
    finally:
        d.close()


def _resume(ck: dict[str, Any], path: Path, cfg: RunConfig, d: Dist, device: torch.device,
            changes: dict[str, Any], time_cap: float | None, notes: list[str], callbacks: Callbacks,
            should_stop: StopCheck) -> TrainResult:
    """The part of `resume` that runs inside the process group (when there is one)."""
    out_dir, step, total, new_max = path.parent, int(ck["step"]), ck.get("total_steps"), changes.get("max_steps")
    world = int(ck.get("world_size", 1))

    def check() -> None:
        if new_max is not None and new_max < step:
            raise CharLMError(f"--max-steps {new_max}: the run is already at step {step}")
        if world == d.world_size:
            return
        # Same streams, hidden state and global batch, split over a different process count.
        streams = cfg.train.batch_size * world
        if streams % d.world_size:
            raise CharLMError(
                f"{path}: the run trains {streams} streams ({cfg.train.batch_size} per process x "
                f"{world}), which {d.world_size} processes cannot share equally")
        cfg.train.batch_size = streams // d.world_size
        notes.append(f"the run was trained by {world} process(es); continuing in {d.world_size} with "
                     f"--batch-size {cfg.train.batch_size} each (the same {streams} streams)")

    d.checked(check)  # once every rank is in the group, so a refusal is printed once
    corpus = d.local_first(lambda: _reopen(ck, path, callbacks))
    trainer = Trainer(cfg, corpus.vocab, corpus.ids, ck["corpus"], out_dir, device, d)
    trainer.load_state_dict(ck)

    def plan() -> None:
        if new_max is not None:
            trainer.total_steps, trainer.plan_final = new_max, True
        elif total is not None and step >= total and time_cap is not None:
            # A finished run given more time: extend by what fits, at the measured speed.
            if trainer.sec_per_step is None:
                raise CharLMError(f"{path}: the run has no measured speed to plan --time with; use --max-steps")
            trainer.total_steps, trainer.plan_final = trainer._plan(time_cap), True
        elif total is not None and step >= total:
            raise CharLMError(
                f"{path}: the run already finished its {total} steps; extend it with --max-steps N "
                f"(N > {step}) or --time DURATION"
            )

    d.checked(plan)
    if d.is_main:
        ckpt_io.clean_temporary(out_dir)
        _truncate_metrics(out_dir / "metrics.jsonl", step)
        ckpt_io.write_atomic(out_dir / "config.toml", to_toml(cfg).encode("utf-8"))
    d.barrier()  # rank 0 has tidied the folder before any rank trains
    callbacks.on_start(_info(trainer, resumed=True))
    for note in notes:
        callbacks.on_message(note)
    return trainer.fit(time_cap, new_max, callbacks, should_stop)


def _reopen(ck: dict[str, Any], path: Path, callbacks: Callbacks) -> EncodedCorpus:
    """The corpus a checkpoint trained on, with the vocabulary it recorded."""
    corpus = reopen_corpus(ck["corpus"], path, progress=callbacks.on_progress)
    if corpus.vocab.chars != ck["vocab"]:
        raise CharLMError(f"{path}: the corpus's vocabulary differs from the checkpoint's")
    return corpus


def corpus_note(corpus: EncodedCorpus) -> str:
    """One line on where the encoded corpus came from."""
    what = (f"corpus: {corpus.desc['chars']:,} characters, {len(corpus.vocab)} distinct, "
            f"{corpus.ids.dtype.name} ids")
    if corpus.encoded:
        rate = corpus.desc["chars"] / max(corpus.seconds, 1e-9) / 1e6
        return f"{what}, encoded in {corpus.seconds:.1f}s ({rate:,.1f} M chars/s), cached in {corpus.path.parent}"
    return f"{what}, from the cache ({corpus.path.parent})"


def _check_changes(cfg: RunConfig, data: dict[str, Any], origin: str) -> None:
    """Refuse a config that changes a setting a resume must keep (architecture, data...)."""
    current = cfg.to_dict()
    candidate = RunConfig.from_dict(data, origin).to_dict() if data else current
    for section, values in data.items():
        for key in values:
            if key in RESUMABLE:
                continue
            if candidate[section][key] != current[section][key]:
                raise CharLMError(
                    f"{origin}: cannot change {section}.{key} on resume (run has "
                    f"{current[section][key]!r}, got {candidate[section][key]!r})"
                )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines written after `step` (the run continues from that checkpoint)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if len(keep) != len(lines):
        ckpt_io.write_atomic(path, "".join(line + "\n" for line in keep).encode("utf-8"))


def _info(trainer: Trainer, resumed: bool) -> dict[str, Any]:
    return {
        "resumed": resumed,
        "out_dir": str(trainer.out_dir),
        "device": trainer.device.type,
        "precision": trainer.precision,
        "params": trainer.model.num_parameters(),
        "vocab_size": len(trainer.vocab),
        "train_chars": len(trainer.split.train),
        "val_chars": len(trainer.split.val),
        "world_size": trainer.dist.world_size,
        "step": trainer.step,
        "total_steps": trainer.total_steps,
        "config": trainer.cfg.to_dict(),
        "corpus": trainer.corpus,
    }

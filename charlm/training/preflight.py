"""Pre-flight checks: what a training session checks and prepares around its writes, the run
folder's lock and the space on the disk (each refusal is one line, before anything is
written); the memory a run needs is `charlm.training.memory`'s."""

from __future__ import annotations

import warnings
from pathlib import Path

from charlm.config.run import RunConfig, to_toml
from charlm.errors import CharLMError, CharLMWarning, WriteFailed
from charlm.model.size import state_values
from charlm.storage.checkpoint import checkpoint_bytes
from charlm.storage.rundir import RunDir, space_warning
from charlm.storage.runlock import RunLock
from charlm.training.distributed import Dist, world_size
from charlm.training.trainer import Trainer


def lock_new(lock: RunLock, run_dir: RunDir, force: bool) -> None:
    """Rank 0 of a new run: the lock first (two starts a moment apart must not both find the
    folder empty), then the folder's check."""
    lock.acquire()
    run_dir.check_new(force)


def prepare_new(run_dir: RunDir, config: str, force: bool, trainer: Trainer) -> None:
    """Rank 0: empty the folder of an old run (--force), write the config, check the space."""
    run_dir.create(force)
    try:
        run_dir.write_config(config)
    except WriteFailed as exc:
        raise WriteFailed(f"{exc}; nothing of this run was trained or saved", exc.path) from None
    warn_disk(trainer, existing=0)


def warn_disk(trainer: Trainer, existing: int) -> None:
    """A warning when --out has less room than the run's checkpoints will take."""
    cfg = trainer.cfg
    hidden = state_values(cfg.model, cfg.train.streams(trainer.dist.world_size))
    size = checkpoint_bytes(trainer.model.num_parameters(), hidden, ema=bool(cfg.train.ema))
    note = space_warning(trainer.run_dir.path, size, cfg.session.keep, existing)
    if note is not None:
        warnings.warn(note, CharLMWarning, stacklevel=3)


def try_lock(lock: RunLock) -> CharLMError | None:
    """Take `lock`; a refusal is returned to be raised once every rank can hear of it (at once
    in a single process)."""
    try:
        lock.acquire()
    except CharLMError as exc:
        if world_size() == 1:
            raise
        return exc
    return None


def stamp(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def same_checkpoint(d: Dist, stamp: int, path: Path) -> None:
    """Under torchrun, every rank must have read the same version of the checkpoint (another
    writer may have replaced it before rank 0 took the lock)."""
    if not d.enabled:
        return
    newest, oldest = d.all_max([stamp, -stamp])
    changed = newest != -oldest
    d.all_or_none(lambda: raise_if(CharLMError(f"{path}: was replaced while the processes read it; start "
                                             "the resume again") if changed and d.is_main else None))


def prepare_resume(run_dir: RunDir, cfg: RunConfig, step: int, trainer: Trainer) -> None:
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
    warn_disk(trainer, existing)


def raise_if(error: CharLMError | None) -> None:
    if error is not None:
        raise error

"""The rules of a resume, as a pure function of the checkpoint and what is asked.

What a resume may change follows from the config's types: `SessionConfig` fields may differ
(flags or `--config`), `ModelConfig` and `TrainConfig` fields may not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from charlm import checkpoint as ckpt_io
from charlm.config import SESSION_KEYS, RunConfig, parse_duration, sectioned
from charlm.errors import CharLMError
from charlm.options import flag


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

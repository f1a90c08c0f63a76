"""The rules of a resume, as a pure function of the checkpoint and what is asked.

What a resume may change follows from the config's types: `SessionConfig` fields may differ
(flags or `--config`), `ModelConfig` and `TrainConfig` fields may not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from charlm.config.options import flag
from charlm.config.run import SESSION_KEYS, RunConfig, sectioned
from charlm.errors import CharLMError
from charlm.storage import checkpoint as ckpt_io


@dataclass
class ResumeSettings:
    """How a session continues a run: its settings, budget and what to say about them."""

    cfg: RunConfig
    time_cap: float | None  # seconds of the --time budget in force (None: no clock)
    max_steps: int | None  # the run's new length, when the session sets one
    extend_by_time: bool = False  # a finished run given --time: as many steps as fit
    notes: list[str] = field(default_factory=list)
    spent: float = 0.0  # seconds of that budget spent before this session


def resume_settings(ck: ckpt_io.Checkpoint, origin: str, changes: dict[str, Any],
                    config_file: dict[str, Any] | None = None, world_size: int = 1,
                    device_available: Callable[[str], bool] = lambda name: True) -> ResumeSettings:
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
    rules = ResumeSettings(cfg, None, asked.get("max_steps") or None)
    step, total = ck.progress.step, ck.budget.total_steps
    if "device" not in asked and cfg.session.device != "auto" and not device_available(cfg.session.device):
        # Trained on a GPU, resumed where there is none: continue on what is here.
        rules.notes.append(f"the run was trained with --device {cfg.session.device}, which is not "
                          "available here; continuing with --device auto")
        cfg.session.device = "auto"
    if "time" in asked:  # a new budget
        rules.time_cap = cfg.session.time_seconds()
    elif not ck.budget.steps_fixed and cfg.session.time and rules.max_steps is None:
        # A --time run stopped before it fixed its step count: finish its original budget,
        # re-planning as it goes, less every second it has spent (the probe, steps and
        # evaluations alike: `charlm.training.budget`).
        rules.time_cap, rules.spent = cfg.session.time_seconds(), ck.budget.spent
    if rules.max_steps is not None and rules.max_steps < step:
        raise CharLMError(f"--max-steps {rules.max_steps}: the run is already at step {step}")
    if rules.max_steps is None and total is not None and step >= total:
        if rules.time_cap is None:
            raise CharLMError(f"{origin}: the run already finished its {total} steps; extend it with "
                              f"--max-steps N (N > {step}) or --time DURATION")
        if ck.budget.sec_per_step is None:
            raise CharLMError(f"{origin}: the run has no measured speed to plan --time with; use --max-steps")
        rules.extend_by_time = True
    world = ck.trained_on.world_size
    if world != world_size:
        # Same streams, hidden state and global batch, split over a different process count.
        streams = cfg.train.streams(world)
        if streams % world_size:
            raise CharLMError(f"{origin}: the run trains {streams} streams ({cfg.train.batch_size} per "
                              f"process x {world}), which {world_size} processes cannot share equally")
        cfg.train.batch_size = streams // world_size
        rules.notes.append(f"the run was trained by {world} process(es); continuing in {world_size} with "
                          f"--batch-size {cfg.train.batch_size} each (the same {streams} streams)")
    return rules

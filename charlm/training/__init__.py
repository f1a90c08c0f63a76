"""Training a model: sessions, the loop, and what they check and plan.

    session.py      `fit` and `resume`: validate, prepare the folder, plan, build, run
    trainer.py      the Trainer: build, step, loop (stop check -> step -> record -> evaluate/save)
    budget.py       the run's length under --time, and its learning-rate schedule
    planner.py      a pure rule: corpus size, budget and measured speeds -> shape and recipe
    probe.py        measuring this machine's speed for the planner
    resuming.py     the rules of a resume, as a pure function of the checkpoint
    finetune.py     starting from another run's weights (--init-from)
    preflight.py    the checks around a run's writes: the lock, disk space
    memory.py       the memory a run needs, checked before anything is allocated
    divergence.py   when a step has diverged
    reads.py        when the host reads a step's loss (every step on a CPU, every few on a GPU)
    distributed.py  torchrun / DDP, and a no-op stand-in for one process
    events.py       what training reports (Callbacks) and returns (TrainResult)
    tensorboard_log.py  --tensorboard: the metrics and previews as TensorBoard event files

Imports: everything below it (config, data, storage, model, generation, the leaves); never
`api`, analysis, serving or the CLI.
"""

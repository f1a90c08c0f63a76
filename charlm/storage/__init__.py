"""What a run keeps on disk: the typed, versioned checkpoint (`checkpoint`) and its digest
(`digest`), what its torchrun processes each keep (`ranks`), the run folder's files and the
order of a save (`rundir`), and its one-writer lock (`runlock`).

Imports: config and the leaves (`errors`, `fs`) only; nothing here knows the model, the
trainer or the time budget that fill a checkpoint.
"""

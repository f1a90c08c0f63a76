"""Looking at a trained model and what it writes.

    novelty.py       how much of a text is copied from the training text
    suffix.py        the suffix-array index of a training text, memory-mapped in the cache
    inspection.py    surprisal, predictions and every unit's state over a passage
    unit_finder.py   the units that track quotes, brackets, line position...
    inspect_page.py  the inspector's self-contained HTML page
    plot.py          the training curves (loss.png)
    report.py        the run's report page and README card

Imports: `api` and everything below it; never serving or the CLI.
"""

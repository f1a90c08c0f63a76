"""Text out of a model.

    sampler.py  the Sampler: temperature, top-k / top-p, stop strings, seeds, batches, whole
                records, training's previews
    stepper.py  one recurrent step for N rows in buffers allocated once

Imports: config, data, model and the leaves.
"""

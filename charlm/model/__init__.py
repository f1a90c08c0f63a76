"""The network and what is computed with it alone.

    network.py  CharRNN: embedding -> LSTM / GRU / RNN (PyTorch's fused kernels) -> head
    size.py     its size arithmetic, once: gates, parameters, FLOPs, state
    scoring.py  bits per character of held-out text and of records; a records batch's loss

Imports: config, data and the leaves.
"""

"""The model's size arithmetic, written once: its gates, its parameters, its compute, its state.

The planner, the memory check, the disk check, the ONNX export, the sampler's stepper and the
benchmarks all count from here (nanoGPT's `get_num_params` / `estimate_mfu` idea): a test
holds `parameter_count` against a built `CharRNN`'s own count for every cell.
"""

from __future__ import annotations

from charlm.config.run import ModelConfig

# Weight rows per hidden unit of each cell: LSTM i, f, g, o; GRU r, z, n; a plain RNN one.
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def parameter_count(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameters of `CharRNN(cfg, vocab_size)`, counted without building it: the embedding,
    each recurrent layer's two weight matrices and two biases, and the head."""
    gates, h = GATES[cfg.cell], cfg.hidden_size
    count = vocab_size * cfg.embedding_size + h * vocab_size + vocab_size  # embedding, head
    inp = cfg.embedding_size
    for _ in range(cfg.num_layers):
        count += gates * h * (inp + h) + 2 * gates * h
        inp = h
    return count


def flops_per_char(cfg: ModelConfig, vocab_size: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of one training character: forward + backward (x3).

    Per layer a gated cell does G*H*(I+H) MACs (G = `GATES[cell]`), then the head H*V.
    """
    gates, h = GATES[cfg.cell], cfg.hidden_size
    macs, inp = 0, cfg.embedding_size
    for _ in range(cfg.num_layers):
        macs += gates * h * (inp + h)
        inp = h
    macs += h * vocab_size
    return 3 * 2 * macs


def state_values(cfg: ModelConfig, streams: int) -> int:
    """Numbers in the recurrent state carried for `streams` rows: h (and c for an LSTM) of
    every layer."""
    return cfg.num_layers * streams * cfg.hidden_size * (2 if cfg.cell == "lstm" else 1)

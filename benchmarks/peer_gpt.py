"""A peer at equal compute: a small GPT of nanoGPT's README CPU shape on the same text.

    python benchmarks/peer_gpt.py /tmp/panel/sotu.txt --budget 240

nanoGPT's README trains its character model on a CPU with: 4 layers, 4 heads, width 128,
block 64, batch 12, AdamW at 1e-3, dropout 0. That model is written here (token and position
embeddings, pre-LayerNorm blocks of causal self-attention and a 4x MLP, a tied output layer,
as nanoGPT's model.py has them), trained on the first 95 % of the text with random blocks,
and scored on the last 5 % -- the characters charlm's runs hold out and score.

The budget is CPU seconds of one thread (`time.process_time`), as in benchmarks/quality.py,
so the comparison with charlm's panel runs is at equal compute and unaffected by other
load on the machine; `--wall` makes it wall-clock seconds with PyTorch's default threads,
to compare with `charlm train --time` on a quiet machine. Scoring: windows of 64
characters at a stride of 32, each character scored once with at least 32 characters of
context (the first window: all of its own).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LN2 = math.log(2.0)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.heads, self.dropout = heads, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block: int, layers: int = 4, heads: int = 4, width: int = 128,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(block, width)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight  # weight tying, as nanoGPT does
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


@torch.inference_mode()
def held_out_bpc(model: GPT, ids: torch.Tensor, block: int) -> tuple[float, int]:
    model.eval()
    stride = block // 2
    bits, count = 0.0, 0
    for start in range(0, len(ids) - 1, stride):
        window = ids[start:start + block + 1]
        if len(window) < 2:
            break
        x, y = window[:-1][None], window[1:][None]
        nats = F.cross_entropy(model(x)[0], y[0], reduction="none")
        first = 0 if start == 0 else block - stride  # characters scored by the previous window
        bits += float(nats[first:].sum()) / LN2
        count += len(nats) - first
        if start + block + 1 >= len(ids):
            break
    model.train()
    return bits / count, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus")
    ap.add_argument("--budget", type=float, default=240.0, help="CPU seconds of one thread")
    ap.add_argument("--wall", action="store_true",
                    help="budget in wall-clock seconds with PyTorch's default threads (a quiet machine)")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    if not args.wall:
        torch.set_num_threads(1)
    clock = time.perf_counter if args.wall else time.process_time
    torch.manual_seed(args.seed)
    text = Path(args.corpus).read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    n_val = max(2, int(len(ids) * 0.05))  # the same held-out characters as charlm's runs
    train, val = ids[:-n_val], ids[-n_val:]
    model = GPT(len(chars), args.block)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    start, steps = clock(), 0
    while clock() - start < args.budget:
        ix = torch.randint(len(train) - args.block - 1, (args.batch,))
        x = torch.stack([train[i:i + args.block] for i in ix])
        y = torch.stack([train[i + 1:i + args.block + 1] for i in ix])
        loss = F.cross_entropy(model(x).reshape(-1, len(chars)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    bpc, scored = held_out_bpc(model, val, args.block)
    print(json.dumps({"peer": "nanoGPT-shape GPT (4x4x128, block 64, batch 12, AdamW 1e-3)",
                      "corpus": args.corpus, "budget_s": args.budget,
                      "clock": "wall" if args.wall else "cpu (one thread)", "threads": torch.get_num_threads(),
                      "steps": steps,
                      "chars_seen": steps * args.batch * args.block,
                      "params": sum(p.numel() for p in model.parameters()),
                      "held_out_bpc": round(bpc, 4), "chars_scored": scored}))


if __name__ == "__main__":
    main()

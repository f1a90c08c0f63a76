"""What differs between the processes of a torchrun launch, and how one checkpoint holds them:
RNG states captured and restored, the weights' digest every rank must share, the ranks'
states merged into one checkpoint, and which saved state a process of a resumed launch takes.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import torch

from charlm.errors import CharLMError
from charlm.storage.checkpoint import Checkpoint, RankState


def capture_rng(device: torch.device) -> dict[str, Any]:
    """Every RNG state training draws from (dropout masks, Python's random)."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(rng["python"]))
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def _as_tuple(value: Any) -> Any:
    """Python's RNG state comes back from a checkpoint with lists where tuples were."""
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the weights' bytes: equal on every rank, or the ranks have drifted apart."""
    digest = hashlib.sha256()
    for t in weights.values():
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def merge_ranks(ranks: list[tuple[RankState, list[torch.Tensor]]], step: int
                ) -> tuple[list[RankState], list[torch.Tensor], list[float]]:
    """Every process's state and hidden rows (in rank order) as one checkpoint's: the ranks,
    one hidden state for all streams, and the loss window as one process would hold it."""
    digests = {r.weights_sha256 for r, _ in ranks}
    if len(digests) > 1:
        raise CharLMError(f"the {len(ranks)} processes' weights differ at step {step}; "
                          "not saving a checkpoint that only one of them would match")
    # Rank r's streams follow rank r-1's, as in the data.
    hidden = ([torch.cat(parts, dim=1) for parts in zip(*(h for _, h in ranks), strict=True)]
              if all(h for _, h in ranks) else [])
    world = len(ranks)
    window = [sum(r.loss_window[0] for r, _ in ranks) / world, ranks[0][0].loss_window[1]]
    return [r for r, _ in ranks], hidden, window


def own_rank_state(ck: Checkpoint, rank: int, world_size: int) -> RankState | None:
    """This process's saved RNG and loss window: its own when the process count is the same,
    rank 0's in a single process; None for an extra process of a larger launch (it starts
    fresh, distinct dropout streams)."""
    if len(ck.ranks) == world_size > 1:
        return ck.ranks[rank]
    if rank == 0:
        return RankState(ck.ranks[0].rng, list(ck.progress.loss_window))
    return None

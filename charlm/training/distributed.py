"""Multi-process training under `torchrun`: the process group and the few collectives the
trainer needs.

torchrun starts one process per GPU (or per CPU share) and tells each its place through
environment variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Without
them, or with WORLD_SIZE=1, `Dist` is a single process and every collective here returns at
once, so single-process training runs the same code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from charlm.errors import CharLMError, PeerFailed

T = TypeVar("T")


@dataclass
class Dist:
    """Where this process stands in a torchrun launch (rank 0 of 1 when it is alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # initialized the process group here, so destroys it in close()
    device: torch.device | None = None  # where collective tensors live (CUDA for NCCL)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_max(self, values: list[int]) -> list[int]:
        """Element-wise maximum over all ranks (every rank gets the same list back)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None on the other ranks)."""
        if not self.enabled:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_or_none(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; when it raises `CharLMError` on any of them, every rank
        raises: the lowest failing rank its own error, the others `PeerFailed`.

        Without this a rank whose input is bad (a missing corpus, say) would exit while the
        others wait in their next collective until gloo/NCCL fails them with a traceback.
        `fn` must not itself use collectives (a failing rank would never reach them).
        """
        if not self.enabled:
            return fn()
        failure: CharLMError | None = None
        result: T | None = None
        try:
            result = fn()
        except CharLMError as exc:
            failure = exc
        messages: list[str | None] = [None] * self.world_size
        dist.all_gather_object(messages, None if failure is None else str(failure))
        failed = [r for r, m in enumerate(messages) if m is not None]
        if failed:
            if failed[0] == self.rank:
                assert failure is not None
                raise failure
            raise PeerFailed(failed[0], str(messages[failed[0]]))
        return result  # type: ignore[return-value]

    def local_first(self, fn: Callable[[], T]) -> T:
        """Run `fn` on each machine's local rank 0 first, then on the other ranks (building a
        cache once per machine, which the others then read). A `CharLMError` on any rank
        stops every rank (`all_or_none`)."""
        if not self.enabled:
            return fn()
        first = self.local_rank == 0
        mine = self.all_or_none(fn if first else _nothing)
        others = self.all_or_none(_nothing if first else fn)
        return mine if first else others  # type: ignore[return-value]

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _nothing() -> None:
    return None


def world_size() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), known before the
    process group is joined."""
    return int(os.environ.get("RANK", "0") or 0) if world_size() > 1 else 0


def from_env(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun process group (NCCL for CUDA, gloo on the CPU) when there is one;
    returns it and the device this rank trains on (its own GPU under CUDA)."""
    world = world_size()
    if world <= 1:
        return Dist(), device
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # device_id binds NCCL to this rank's GPU up front (no guessing in barrier()).
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        owns = True
    coll = device if dist.get_backend() == "nccl" else torch.device("cpu")
    return Dist(rank, world, local, owns, coll), device

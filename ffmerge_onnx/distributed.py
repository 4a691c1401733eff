"""Several processes under torchrun: the process group, data shards, reductions and the rule that
rank 0 alone writes. Every helper is a no-op in a single process, so one code path serves both.

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK and the rendezvous; `start` joins the group (NCCL when the
process has a GPU, else gloo). A rank that fails exits non-zero and torchrun stops the others."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import nn

from .errors import EXIT_PEER, FFMergeError, InputError

TIMEOUT_ENV = "FFMERGE_ONNX_DIST_TIMEOUT"  # seconds a rank waits for the others (rank 0 exporting: long)
DEFAULT_TIMEOUT_S = 4 * 3600


class DistributedError(FFMergeError):
    """The ranks disagree (different weights after merging) or the group cannot start."""

    exit_code = EXIT_PEER


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def world() -> World:
    if not _joined():
        return World()
    import torch.distributed as dist

    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _joined() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def launched() -> bool:
    """True when torchrun (or another launcher setting WORLD_SIZE) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start() -> World:
    """Join the process group torchrun describes (a no-op without one)."""
    if not launched() or _joined():
        return world()
    import torch.distributed as dist

    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=timeout)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"Cannot join the process group ({e}); start with torchrun.") from e
    return world()


def stop() -> None:
    if _joined():
        import torch.distributed as dist

        dist.destroy_process_group()


def device() -> torch.device:
    """Where this rank trains: its GPU under NCCL, else the CPU."""
    if _joined() and torch.cuda.is_available():
        return torch.device("cuda", world().local_rank)
    return torch.device("cpu")


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout",
             "NCCL communicator was aborted")  # fmt: skip


def peer_failed(e: BaseException) -> bool:
    """Whether an error means another rank of this job died (its sockets closed under a collective)."""
    if not world().active:
        return False
    import torch.distributed as dist

    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(s in str(e) for s in PEER_GONE))


# -- data --------------------------------------------------------------------------------
def shard(items: list) -> list:
    """This rank's share of a list: every size-th item from its rank (all of it in one process)."""
    w = world()
    return items[w.rank :: w.size] if w.active else list(items)


def batch_rows(batch: dict) -> int:
    """Rows (items) in a batch: the first dimension of its first tensor."""
    return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim())


def take_rows(batch: dict, lo: int, hi: int) -> dict:
    """Rows lo:hi of a batch (every tensor with the batch's first dimension; other entries as they are)."""
    rows = batch_rows(batch)
    return {
        k: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v for k, v in batch.items()
    }


def shard_rows(batch: dict, rank: int | None = None, size: int | None = None) -> dict:
    """This rank's rows of one global batch (every tensor with the batch's first dimension)."""
    w = world()
    rank, size = (w.rank if rank is None else rank), (w.size if size is None else size)
    if size == 1:
        return batch
    rows = batch_rows(batch)
    if rows < size:
        raise InputError(
            f"A recovery batch has {rows} rows, fewer than the {size} processes; use larger batches or fewer processes."
        )
    return take_rows(batch, rank * rows // size, (rank + 1) * rows // size)


# -- collectives ---------------------------------------------------------------------------
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (float64 statistics stay float64)."""
    if world().active:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank src's value on every rank."""
    if not world().active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world().active:
        import torch.distributed as dist

        dist.barrier()


def digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (by name; tied ones once)."""
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_identical(model: nn.Module, what: str = "the merged weights") -> None:
    """Every rank holds the same weights, or DistributedError."""
    if not world().active:
        return
    import torch.distributed as dist

    mine = digest(model)
    every: list[str] = [""] * world().size
    dist.all_gather_object(every, mine)
    if len(set(every)) != 1:
        differ = [r for r, d in enumerate(every) if d != every[0]]
        raise DistributedError(
            f"The ranks disagree on {what} (ranks {differ} differ from rank 0). Run with the same data, "
            "versions and thread settings on every node."
        )


@contextlib.contextmanager
def main_writes() -> Iterator[bool]:
    """Rank 0 does the body (True); the others skip it (False) and every rank waits at the end. A
    failure on rank 0 ends its process; torchrun then stops the ranks waiting here."""
    w = world()
    yield w.main
    barrier()

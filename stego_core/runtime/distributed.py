"""Several processes, one run: rank and world size from the launcher, sharding and gathering (torch.distributed).

A step launched by ``torchrun --nproc_per_node N -m experiments.<step> ...`` (or by ``srun`` on SLURM, one task
per device) runs as N processes. Each calls :func:`init_from_env` first: the process group is made once
(``gloo`` on CPU, ``nccl`` for CUDA tensors), before anything else, so that rank 0 can open the one MLflow run
and hand its id to the others (:func:`broadcast_object`) and Lightning finds the group ready (it then skips its
own initialisation). Without a launcher every function here is the single-process identity: world size 1,
rank 0, :func:`shard` returns everything, :func:`gather_objects` a list of one.

Only rank 0 talks to MLflow: :mod:`stego_core.platform.tracking` asks :func:`is_main` before writing.

>>> shard(["a", "b", "c", "d", "e"], rank=1, world_size=2)
['b', 'd']
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from stego_core._checks import check_choice, check_range

#: ``trainer.strategy`` values: ``auto`` is one process for one device and DDP for more.
STRATEGIES = ("auto", "ddp")


PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")


@dataclass(frozen=True)
class TrainerSettings:
    """How many processes a learned step runs on (Lightning's ``Trainer`` arguments of the same names).

    ``devices`` processes per machine (one per GPU; CPU processes with ``train.accelerator=cpu``) on
    ``num_nodes`` machines. More than one process is launched from outside, one command per machine:
    ``torchrun --nproc_per_node <devices> [--nnodes <num_nodes> ...] -m experiments.<step> ...`` or ``srun``
    (SLURM, one task per device); :mod:`stego_core.runtime.distributed` joins them, rank 0 alone logs to MLflow and
    writes the run's files. ``strategy: auto`` is a single process for one device and DDP (gradients averaged
    over ranks, the batch size per process) for more. ``precision: auto`` is each step's own default (STEGO:
    ``32-true``; DINO: bf16 autocast on a GPU, float32 on CPU).
    """

    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        check_range(self.devices, "trainer.devices", 1)
        check_range(self.num_nodes, "trainer.num_nodes", 1)
        check_choice(self.strategy, "trainer.strategy", STRATEGIES)
        check_choice(self.precision, "trainer.precision", PRECISIONS)

    @property
    def world_size(self) -> int:
        """Processes in all: ``devices * num_nodes``."""
        return self.devices * self.num_nodes

    def lightning_strategy(self) -> str:
        """The Lightning strategy: ``ddp`` for more than one process under ``auto``, else as given."""
        return "ddp" if self.strategy == "auto" and self.world_size > 1 else self.strategy



T = TypeVar("T")

__all__ = ["ShardedBatchSampler", "all_gather_with_grad", "average_gradients", "barrier", "broadcast_object",
           "gather_objects", "global_rank", "init_from_env", "is_main", "launched_world_size", "local_rank",
           "main_first", "shard", "world_size"]


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def launched_world_size() -> int:
    """How many processes the launcher started: ``WORLD_SIZE`` (torchrun) or ``SLURM_NTASKS`` under ``srun``
    (1 without a launcher)."""
    if _initialized():
        import torch.distributed as dist

        return dist.get_world_size()
    n = _env_int("WORLD_SIZE")
    if n is None and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        n = _env_int("SLURM_NTASKS")
    return n or 1


def world_size() -> int:
    """Processes of this run (1 without a launcher)."""
    return launched_world_size()


def global_rank() -> int:
    """This process's rank among all of them, 0 without a launcher (``RANK``, else ``SLURM_PROCID``)."""
    if _initialized():
        import torch.distributed as dist

        return dist.get_rank()
    return _env_int("RANK", "SLURM_PROCID") or 0


def local_rank() -> int:
    """This process's rank on its machine (the GPU it uses): ``LOCAL_RANK``, else ``SLURM_LOCALID``, else 0."""
    return _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0


def is_main() -> bool:
    """Whether this is rank 0, the process that logs to MLflow and writes the run's files."""
    return global_rank() == 0


def init_from_env(*, devices: int | None = None, num_nodes: int | None = None, timeout_s: float = 1800.0) -> int:
    """Join the process group the launcher prepared (once; later calls do nothing); returns the world size.

    Under torchrun the rendezvous comes from ``MASTER_ADDR`` / ``MASTER_PORT`` / ``RANK`` / ``WORLD_SIZE``;
    under SLURM (``srun``, one task per device) Lightning's ``SLURMEnvironment`` supplies them. The backend is
    ``gloo`` on a machine without CUDA and ``cpu:gloo,cuda:nccl`` with it (this process's GPU is
    ``cuda:<local rank>``).

    Parameters
    ----------
    devices, num_nodes : int, optional
        The config's ``trainer.devices`` / ``trainer.num_nodes``: when given, ``devices * num_nodes`` must
        equal the launched world size, and more than one process without a launcher is refused with the
        command that launches them.

    Raises
    ------
    ValueError
        The launcher's world size differs from ``devices * num_nodes``, or several processes are asked for
        but none was launched.
    """
    import torch
    import torch.distributed as dist

    n = launched_world_size()
    if devices is not None:
        wanted = devices * (num_nodes or 1)
        if n == 1 and wanted > 1:
            raise ValueError(
                f"trainer.devices={devices} x trainer.num_nodes={num_nodes or 1} asks for {wanted} processes but "
                f"this is one process: launch them with `torchrun --nproc_per_node {devices}"
                + (f" --nnodes {num_nodes} --node_rank <i> --master_addr <host>" if (num_nodes or 1) > 1 else "")
                + " -m experiments.<step> ...` (or `srun --ntasks-per-node "
                f"{devices}` on SLURM)")
        if n > 1 and wanted != n:
            raise ValueError(f"trainer.devices={devices} x trainer.num_nodes={num_nodes or 1} = {wanted} processes, "
                             f"but the launcher started {n}; make them agree")
    if n == 1 or _initialized():
        return n
    if "MASTER_ADDR" not in os.environ and "SLURM_PROCID" in os.environ:
        from lightning.fabric.plugins.environments import SLURMEnvironment

        slurm = SLURMEnvironment()
        os.environ.update({"MASTER_ADDR": slurm.main_address, "MASTER_PORT": str(slurm.main_port),
                           "RANK": str(slurm.global_rank()), "WORLD_SIZE": str(slurm.world_size()),
                           "LOCAL_RANK": str(slurm.local_rank())})
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())  # "cuda" now means this process's GPU
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend, init_method="env://", rank=global_rank(), world_size=n,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return n


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first, the others after it (e.g. rank 0 writes a cache that the others then read)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast_object(obj: T, *, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (any picklable object)."""
    if not _initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` on every rank, in rank order (``[obj]`` for one process)."""
    if not _initialized():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items: Sequence[T], *, rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th one from index ``rank`` (balanced when the items
    cost alike; everything for one process)."""
    rank = global_rank() if rank is None else rank
    n = launched_world_size() if world_size is None else world_size
    return list(items[rank::n])


def average_gradients(params: Sequence[Any]) -> None:
    """Replace each parameter's gradient by its mean over the ranks (what DDP does), in one flat all-reduce."""
    if not _initialized():
        return
    import torch
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _gather_function() -> Any:
    import torch
    import torch.distributed as dist

    class _AllGather(torch.autograd.Function):
        """All-gather along dim 0 whose backward sums the gradients of every rank's copy of the loss (an
        all-reduce, which gloo supports) and keeps this rank's slice."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, x.contiguous())
            return torch.cat(parts)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            grad = grad.contiguous()
            dist.all_reduce(grad)
            return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]

    return _AllGather


def all_gather_with_grad(x: Any) -> Any:
    """Every rank's ``x (B, ...)`` concatenated in rank order ``(world_size * B, ...)``, differentiable.

    When every rank computes the same loss of the gathered batch, the gradient reaching this rank's ``x`` is
    ``world_size`` times that loss's gradient; DDP's mean over ranks then gives each parameter exactly the
    gradient of one process holding the whole batch. ``x`` itself for one process.
    """
    if not _initialized() or launched_world_size() == 1:
        return x
    return _gather_function().apply(x)


class ShardedBatchSampler:
    """Batches of this rank's share of a sampler's global batches: the sampler's index stream is cut into global
    batches of ``batch_size * world_size`` (the last incomplete one dropped), and rank ``r`` takes items
    ``r * batch_size .. (r + 1) * batch_size - 1`` of each. One process of ``world_size * batch_size`` and
    ``world_size`` processes of ``batch_size`` thus see the same global batches.

    Parameters
    ----------
    sampler : iterable of int
        The single-process sampler (``RandomSampler``, ``WeightedRandomSampler``, ...), the same on every rank
        (same seed).
    batch_size : int
        Items per rank and batch.
    rank, world_size : int
    """

    def __init__(self, sampler: Any, batch_size: int, *, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size={batch_size}, rank={rank}, world_size={world_size}: need batch_size >= 1 "
                             "and 0 <= rank < world_size")
        self.sampler, self.batch_size, self.rank, self.world_size = sampler, batch_size, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        size = self.batch_size * self.world_size
        batch: list[int] = []
        for i in self.sampler:
            batch.append(int(i))
            if len(batch) == size:
                yield batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
                batch = []

    def __len__(self) -> int:
        return len(self.sampler) // (self.batch_size * self.world_size)

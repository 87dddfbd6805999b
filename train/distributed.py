"""Processes and data sharding: torchrun's environment, gradient averaging, one global sample order.

``setup()`` reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). One process
without them runs without a process group. Several processes use NCCL on CUDA and gloo on the CPU; on CUDA each
process selects ``cuda:LOCAL_RANK`` *before* ComfyUI's model management is imported (it fixes its device at
import time), so call ``setup()`` before loading the base model.

Gradients are averaged with explicit all-reduces after backward rather than through DistributedDataParallel:
methods may run the UNet several times per step (AnyLogo: a subject pass and a generation pass), may leave some
parameters unused in a step, and call the model through ComfyUI's own entry points, none of which DDP's
forward-wrapping model handles without extra flags. An explicit reduce after the micro-batches of a step has
the same result and needs nothing from the method.

The data order is global: the sample at stream position ``p`` (``p = step * batch_size + j``) is
``permutation(seed, epoch)[p mod N]``, and the ``j``-th sample of a step belongs to micro-step
``j // (world * micro)`` and rank ``(j // micro) mod world``. Any number of processes therefore sees exactly
the samples one process would see, and a resumed run continues at the right sample from the step alone.
With per-sample weights (a method's ``sample_weights``, e.g. AnyLogo's data sources) each epoch of ``N`` positions
is instead ``N`` seeded draws with replacement in proportion to the weights: the same split-independence holds.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup() -> DistInfo:
    """Initialise the process group from torchrun's environment and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, device)


def teardown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_object(info: DistInfo, obj):
    """Rank 0's ``obj`` on every rank (pickled through the process group; only our own values travel)."""
    if not info.distributed:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(info: DistInfo, obj) -> list:
    """``obj`` of every rank, in rank order, on every rank."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_parameters(info: DistInfo, params) -> None:
    """Make every rank start from rank 0's values (covers any random initialisation of new modules)."""
    if info.distributed:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


def average_gradients(info: DistInfo, params, bucket_bytes: int = 32 << 20) -> None:
    """Replace each ``p.grad`` by its mean over ranks, in flat buckets to keep the number of reductions small.
    A parameter without a gradient on this rank contributes zeros (all ranks then agree on a tensor)."""
    if not info.distributed:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for p in params + [None]:
        if p is not None:
            bucket.append(p)
            size += p.grad.numel() * p.grad.element_size()
        if bucket and (p is None or size >= bucket_bytes):
            flat = torch.cat([q.grad.reshape(-1) for q in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= info.world_size
            offset = 0
            for q in bucket:
                n = q.grad.numel()
                q.grad.copy_(flat[offset:offset + n].view_as(q.grad))
                offset += n
            bucket, size = [], 0


def all_reduce_mean(info: DistInfo, values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of a small tensor over ranks (used for losses, metrics and the non-finite flag)."""
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def mix_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings, stable across processes, platforms and Python runs."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _checked_weights(weights, size: int) -> torch.Tensor:
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
    if w.numel() != size:
        raise ValueError(f"{w.numel()} sample weights for a dataset of {size} rows")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("sample weights must be finite, non-negative and not all zero")
    return w


class GlobalOrder:
    """The deterministic global sample stream and this rank's share of each step (see the module docstring)."""

    def __init__(self, dataset_size: int, batch_size: int, micro_batch_size: int, info: DistInfo, seed: int,
                 shuffle: bool = True, weights=None, stream=None):
        if batch_size % (micro_batch_size * info.world_size):
            raise ValueError(f"batch_size {batch_size} must be a multiple of micro_batch_size {micro_batch_size} "
                             f"x {info.world_size} processes")
        self.size, self.batch, self.micro, self.info = dataset_size, batch_size, micro_batch_size, info
        self.seed, self.shuffle = seed, shuffle
        self.weights = None if weights is None else _checked_weights(weights, dataset_size)
        # a method's own stream (``index_at(position)``, e.g. CustomContrast's views grouped by subject) replaces
        # the permutation; it must itself depend only on the position, so the split-independence above holds
        self.stream = stream
        if stream is not None:
            stream.check_split(batch_size, micro_batch_size * info.world_size)
        self.accumulation = batch_size // (micro_batch_size * info.world_size)
        self._perm_epoch, self._perm = None, None

    def index_at(self, position: int) -> int:
        if self.stream is not None:
            return self.stream.index_at(position)
        epoch, offset = divmod(position, self.size)
        if not self.shuffle and self.weights is None:
            return offset
        if self._perm_epoch != epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, "order", epoch))
            draw = (torch.randperm(self.size, generator=gen) if self.weights is None else
                    torch.multinomial(self.weights, self.size, replacement=True, generator=gen))
            self._perm, self._perm_epoch = draw.tolist(), epoch
        return self._perm[offset]

    def positions(self, micro_step: int) -> list[int]:
        """Positions ``j`` within the step of this rank's samples for micro-step ``micro_step``."""
        first = micro_step * self.micro * self.info.world_size + self.info.rank * self.micro
        return list(range(first, first + self.micro))

    def micro_batches(self, start_step: int, end_step: int):
        """(step, micro_step, positions j, dataset indices) for this rank, steps start_step..end_step-1."""
        for step in range(start_step, end_step):
            for a in range(self.accumulation):
                js = self.positions(a)
                yield step, a, js, [self.index_at(step * self.batch + j) for j in js]

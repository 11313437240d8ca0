"""A model made data-parallel with DDP or FSDP2, its communication clock, and its state.

DDP keeps a full replica per rank and all-reduces gradients in buckets during backward. FSDP2
(``fully_shard``, one unit per block plus the root for the embedding, tied head and final norm)
keeps 1/world_size of every parameter, gradient and optimiser moment per rank: it all-gathers a
block's parameters before its forward and backward and reduce-scatters its gradients. Both
average gradients over ranks, so with equal rows per rank a step equals one process's step over
the whole batch up to float32 reduction order.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import (
    DefaultAllGather,
    DefaultReduceScatter,
)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Whole, unsharded tensors on the CPU: the same state whatever the world size, so a run saved
with N processes loads with M."""


class CommClock:
    """Wall time of the gradient and parameter collectives, from launch to completion, summed
    per step. The collectives are asynchronous and overlap with backward (DDP buckets, FSDP's
    prefetched all-gathers), so this is the time communication was in flight, an upper bound
    on the time it cost."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds = 0.0

    def add(self, seconds: float) -> None:
        with self._lock:
            self._seconds += seconds

    def timed(self, work: dist.Work | None, started: float) -> dist.Work | None:
        """Count ``work`` (an async collective launched at ``started``) when it completes; a
        synchronous one (None) has completed already."""
        if work is None:
            self.add(time.perf_counter() - started)
            return None
        work.get_future().then(lambda _: self.add(time.perf_counter() - started))
        return work

    def pop_ms(self) -> float:
        """Milliseconds since the last call."""
        with self._lock:
            seconds, self._seconds = self._seconds, 0.0
        return 1000 * seconds


def _timed_allreduce(clock, bucket):  # unannotated: DDP rejects string annotations
    """DDP's default hook (average the bucket over ranks), timed."""
    started = time.perf_counter()
    tensor = bucket.buffer().div_(dist.get_world_size())
    future = dist.all_reduce(tensor, async_op=True).get_future()

    def done(fut: torch.futures.Future) -> torch.Tensor:
        clock.add(time.perf_counter() - started)
        return fut.value()[0]

    return future.then(done)


class _TimedAllGather(DefaultAllGather):
    def __init__(self, clock: CommClock) -> None:
        self.clock = clock

    def __call__(self, output_tensor, input_tensor, group, async_op=False):  # type: ignore[override]
        started = time.perf_counter()
        return self.clock.timed(
            super().__call__(output_tensor, input_tensor, group, async_op), started
        )


class _TimedReduceScatter(DefaultReduceScatter):
    def __init__(self, clock: CommClock) -> None:
        self.clock = clock

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):  # type: ignore[override]
        started = time.perf_counter()
        return self.clock.timed(
            super().__call__(output_tensor, input_tensor, group, op, async_op), started
        )


def make_parallel(
    model: nn.Module, parallel: str, device: torch.device
) -> tuple[nn.Module, CommClock]:
    """``(module to call, its clock)``. DDP returns a wrapper around ``model``; FSDP2 shards
    ``model`` in place (its parameters become DTensors) and returns it. ``model.blocks`` are
    the FSDP units, so one block's full parameters exist at a time."""
    clock = CommClock()
    if parallel == "ddp":
        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        ddp.register_comm_hook(clock, _timed_allreduce)
        return ddp, clock
    if parallel != "fsdp":
        raise ValueError(f"parallel must be ddp or fsdp, got {parallel!r}")
    # A unit's outputs include its mixers' states (views of keys and values, unused while
    # training and never changed in place), which FSDP2 warns about on every forward.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    units = [*model.blocks, model]
    for unit in units:
        fully_shard(unit)
    for unit in units:
        unit.set_custom_all_gather(_TimedAllGather(clock))
        unit.set_custom_reduce_scatter(_TimedReduceScatter(clock))
    return model, clock


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient collectives of a micro-batch that is not the step's last (gradient
    accumulation): the gradients are averaged once, after the last one."""
    if isinstance(module, DistributedDataParallel) and not sync:
        with module.no_sync():
            yield
        return
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(sync)
    yield


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimiser state keyed by parameter names (not positions), so it loads into
    the same model sharded any other way."""
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state from :func:`optimizer_state`, sharding it as ``model`` is sharded."""
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )

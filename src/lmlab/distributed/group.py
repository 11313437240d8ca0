"""The process group of a run launched by ``torchrun`` and the few collectives the trainer needs.

``torchrun`` (or ``lmlab train --nproc N``, which starts it) sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in every process; :func:`join` reads them and
connects the processes with gloo (CPU) or nccl (CUDA). Every collective has the group's timeout,
so a rank that dies or stops answering ends the others with an error instead of a hang.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from lmlab.errors import LmlabError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the job (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes the run folder: metrics, logs, summary, checkpoints' small files."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1


def launched_ranks() -> Ranks:
    """The ranks ``torchrun`` gave this process through the environment (none: one process)."""
    env = os.environ
    return Ranks(
        int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    )


def current_ranks() -> Ranks:
    """This process's ranks once :func:`join` connected it, else rank 0 of 1."""
    if not dist.is_available() or not dist.is_initialized():
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), launched_ranks().local_rank)


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """Each process on one node takes its own GPU (``cuda:LOCAL_RANK``); CPU ranks share the CPU."""
    if device.type != "cuda" or not ranks.several:
        return device
    device = torch.device("cuda", ranks.local_rank)
    torch.cuda.set_device(device)
    return device


def join(parallel: str, device: torch.device, timeout_s: float) -> Ranks:
    """Connect the processes ``torchrun`` started (nothing to do for one process).

    The backend follows the device: nccl for CUDA, gloo for CPU."""
    ranks = launched_ranks()
    if not ranks.several:
        return ranks
    if parallel == "none":
        raise LmlabError(
            f"this job runs {ranks.world_size} processes but train.parallel=none, so each would "
            "train its own copy; set train.parallel=ddp or train.parallel=fsdp"
        )
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return current_ranks()


def leave() -> None:
    """Close the process group (a process may join again later, e.g. in tests)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_zero_decides(decide: Callable[[], T]) -> T:
    """Run ``decide`` on rank 0 only and hand its result, or its one-line error, to every rank:
    a choice that must be made once (claiming a new run folder, naming it) without leaving the
    other ranks waiting forever when rank 0 refuses."""
    ranks = current_ranks()
    if not ranks.several:
        return decide()
    outcome: list = [None, None]
    if ranks.main:
        try:
            outcome[0] = decide()
        except LmlabError as exc:
            outcome[1] = str(exc)
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise LmlabError(outcome[1])
    return outcome[0]


def gather_numbers(values: Sequence[float]) -> torch.Tensor:
    """Every rank's ``values`` as a float64 ``[world_size, len(values)]`` table, on every rank
    (one small all-gather per step carries the loss, timings and the stop request)."""
    row = torch.tensor([list(values)], dtype=torch.float64)
    ranks = current_ranks()
    if not ranks.several:
        return row
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    row = row.to(device)
    table = [torch.empty_like(row) for _ in range(ranks.world_size)]
    dist.all_gather(table, row)
    return torch.cat(table).cpu()


def barrier() -> None:
    if current_ranks().several:
        dist.barrier()


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m lmlab ARGV`` for this Python: one node, a
    free rendezvous port chosen by torchrun."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "lmlab",
        *argv,
    ]


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``lmlab ARGV`` in ``nproc`` processes under torchrun and return its exit code: torchrun
    stops every process when one fails and exits non-zero with that rank's error.

    Ctrl-C reaches torchrun and the ranks directly (one terminal process group), so this
    process only waits for them; a SIGTERM sent to it alone is passed on to torchrun, which
    passes it to every rank."""
    process = subprocess.Popen(torchrun_command(nproc, argv))
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(
            signal.SIGTERM, lambda signum, frame: process.send_signal(signal.SIGTERM)
        ),
    }
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

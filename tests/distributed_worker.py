"""``lmlab`` as one rank of a torchrun job in the tests, where ``LMLAB_TEST_FAIL`` (``rank:step``)
makes that rank raise after that step and ``LMLAB_TEST_HANG`` makes it stop answering there:
how a rank that breaks or hangs ends the job."""

import os
import sys
import time

from lmlab.cli import main
from lmlab.train.trainer import Trainer


def break_at(rank: int, step: int, hang: bool) -> None:
    original = Trainer._step

    def step_then_break(self: Trainer) -> None:
        original(self)
        if self.ranks.rank == rank and self.state.step == step:
            if hang:
                time.sleep(3600)
            raise RuntimeError(f"rank {rank} broke after step {step}")

    Trainer._step = step_then_break


for variable, hang in (("LMLAB_TEST_FAIL", False), ("LMLAB_TEST_HANG", True)):
    if variable in os.environ:
        rank, step = map(int, os.environ[variable].split(":"))
        break_at(rank, step, hang)
sys.exit(main(sys.argv[1:]))

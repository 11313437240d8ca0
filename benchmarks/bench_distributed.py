"""Data parallelism on this machine, and a scaling model on paper for GPUs.

1. Throughput: the same global batch trained by 1 process x 2 threads and by 2 processes x 1
   thread (DDP, FSDP2; gloo on CPU), each a real ``lmlab train`` run; tokens/s and the share of
   a step the gradient/parameter collectives were in flight (``ranks.comm_ms / ranks.step_ms``
   of the metrics), medians over the steps after the first 5.
2. Memory per rank with FSDP2 against DDP for the ``sigma`` preset: bytes of parameters,
   gradients and optimiser state each rank holds after one optimiser step (2 ranks, measured
   on the tensors themselves, on CPU), and the peak resident set of each rank.
3. A scaling model for 8 GPUs and 2 nodes x 8 GPUs at the ``nexus`` and ``sigma`` shapes and a
   ~125M-parameter GPT: training FLOPs per token from lmlab's count (``flops_per_token``, the
   same count the budgets use), communication volume per step, and the global batch needed to
   keep communication under 10% of a step, with the link bandwidths and GPU throughput stated
   in ``LINKS`` and ``GPU_FLOPS``.

    python benchmarks/bench_distributed.py                 # all three (several minutes)
    python benchmarks/bench_distributed.py --only scaling  # the paper model alone (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from timing import machine

SHAPE = [
    "--preset",
    "gpt-tiny",
    "train.batch_size=16",
    "data.seq_len=128",
    "train.optimizer=adamw",
    "train.precision=fp32",
    "train.eval_interval=100000",
    "train.eval_batches=1",
    "train.checkpoint_interval=100000",
]
GPU_FLOPS = 400e12
"""Sustained bf16 training throughput of one H100 SXM: ~40% of its 989 TFLOP/s dense peak."""
LINKS = {
    "8 GPUs (1 node, NVLink 4)": (8, 360e9),
    "2 nodes x 8 GPUs (InfiniBand NDR 400 Gb/s per GPU)": (16, 45e9),
}
"""GPUs and the bus bandwidth a ring collective reaches per GPU, bytes/s: NVLink 4 gives 450
GB/s per direction per GPU, of which NCCL's all-reduce reaches ~80%; across nodes the ring is
limited by each GPU's 400 Gb/s (50 GB/s) NIC, ~90% of it reached."""


def median_after_warmup(rows: list[dict], value) -> float:
    return statistics.median(value(row) for row in rows[5:])


def train_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == "train"]


def throughput(steps: int) -> None:
    print("\n## Throughput: the same global batch (16 x 128 tokens), CPU, gloo\n")
    print("| setup | tokens/s | step ms | communication in flight, share of a step |")
    print("|---|---:|---:|---:|")
    setups = [
        ("1 process x 2 threads", 1, 2, "none"),
        ("2 processes x 1 thread, DDP", 2, 1, "ddp"),
        ("2 processes x 1 thread, FSDP2", 2, 1, "fsdp"),
    ]
    with tempfile.TemporaryDirectory() as out:
        for label, nproc, threads, parallel in setups:
            name = f"{parallel}-{nproc}"
            command = [sys.executable, "-m", "lmlab", "train", "--quiet", "--nproc", str(nproc)]
            command += [*SHAPE, f"train.max_steps={steps}", f"train.threads={threads}"]
            command += [f"train.parallel={parallel}", f"out_dir={out}", f"name={name}"]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            subprocess.run(command, check=True, env=env, capture_output=True)
            rows = train_rows(Path(out) / name)
            tokens = median_after_warmup(rows, lambda row: row["tokens_per_s"])
            step = median_after_warmup(rows, lambda row: row["step_ms"])
            share = (
                median_after_warmup(
                    rows,
                    lambda row: statistics.fmean(
                        c / s
                        for c, s in zip(
                            row["ranks"]["comm_ms"], row["ranks"]["step_ms"], strict=True
                        )
                    ),
                )
                if nproc > 1
                else 0.0
            )
            print(f"| {label} | {tokens:,.0f} | {step:.1f} | {100 * share:.0f}% |")


def memory_worker(parallel: str) -> None:
    """One rank: the sigma preset made parallel, one optimiser step, its tensors' bytes."""
    import resource

    import torch.nn.functional as F

    from lmlab.config.load import build_config
    from lmlab.distributed.group import join
    from lmlab.distributed.parallel import make_parallel
    from lmlab.model.lm import LanguageModel
    from lmlab.train.optim import build_optimizers

    config = build_config("sigma", ["model.vocab_size=128", "train.precision=fp32"])
    ranks = join(parallel, torch.device("cpu"), 600)
    torch.manual_seed(0)
    model = LanguageModel(config.model)
    module, _ = make_parallel(model, parallel, torch.device("cpu"))
    optimizers = build_optimizers(model, config.train, torch.device("cpu"))
    x = torch.randint(0, 128, (2, 64))
    logits, _ = module(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), x.flatten())
    aux = model.auxiliary_loss()
    (loss if aux is None else loss + aux).backward()
    optimizers.step()

    def local_bytes(tensor: torch.Tensor) -> int:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return local.numel() * local.element_size()

    parameters = list({id(p): p for p in model.parameters()}.values())
    states = [
        value
        for optimizer in optimizers.optimizers.values()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]
    print(
        "MEMORY "
        + json.dumps(
            {
                "rank": ranks.rank,
                "parameters": sum(local_bytes(p) for p in parameters),
                "gradients": sum(local_bytes(p.grad) for p in parameters if p.grad is not None),
                "optimizer": sum(local_bytes(s) for s in states),
                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "count": sum(p.numel() for p in parameters),
            }
        ),
        flush=True,
    )
    torch.distributed.destroy_process_group()


def memory() -> None:
    print("\n## Memory per rank, sigma preset, 2 ranks, after one optimiser step (Muon + AdamW)\n")
    header = ["parallel", "rank", "parameters MiB", "gradients MiB", "optimiser MiB", "sum MiB"]
    print("| " + " | ".join([*header, "peak RSS MiB"]) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for parallel in ("ddp", "fsdp"):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            __file__,
            "--memory-worker",
            parallel,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
        rows = [
            json.loads(line.split("MEMORY ", 1)[1])
            for line in done.stdout.splitlines()
            if "MEMORY " in line
        ]
        for row in sorted(rows, key=lambda row: row["rank"]):
            mib = [row[key] / 2**20 for key in ("parameters", "gradients", "optimizer")]
            print(
                f"| {parallel} | {row['rank']} | {mib[0]:.2f} | {mib[1]:.2f} | {mib[2]:.2f} "
                f"| {sum(mib):.2f} | {row['peak_rss'] / 2**20:.0f} |"
            )
    print(f"\n({rows[0]['count']:,} parameters)")


def scaling() -> None:
    from lmlab.config.load import build_config
    from lmlab.model.lm import LanguageModel

    shapes = {
        "nexus": build_config("nexus", ["model.vocab_size=1000"]),
        "sigma": build_config("sigma", ["model.vocab_size=128"]),
        "GPT ~125M": build_config(
            "gpt-tiny",
            [
                "model.d_model=768",
                "model.n_layers=12",
                "model.n_heads=12",
                "model.vocab_size=50304",
                "model.mlp_hidden=2048",
                "data.seq_len=1024",
            ],
        ),
    }
    print(
        f"\n## Scaling model: {GPU_FLOPS / 1e12:.0f} TFLOP/s per GPU sustained, gradients "
        "all-reduced in float32 (DDP: 2(N-1)/N x 4 bytes x parameters through each GPU's link; "
        "FSDP2: all-gather twice + reduce-scatter, 3(N-1)/N x 4 bytes x parameters), not "
        "overlapped with compute\n"
    )
    print(
        "| shape | parameters | train GFLOP/token | GPUs, link | DDP MB/step/GPU | DDP comm ms "
        "| FSDP comm ms | global batch for comm < 10% (DDP), tokens | (FSDP), tokens | "
        "sequences (DDP) |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for name, config in shapes.items():
        with torch.device("meta"):
            model = LanguageModel(config.model)
        count = model.num_parameters()
        seq = config.data.seq_len
        flops = 3 * model.flops_per_token(seq)
        for link, (gpus, bandwidth) in LINKS.items():
            ddp_bytes = 2 * (gpus - 1) / gpus * 4 * count
            fsdp_bytes = 3 * (gpus - 1) / gpus * 4 * count
            needed = {}
            for kind, volume in (("ddp", ddp_bytes), ("fsdp", fsdp_bytes)):
                comm = volume / bandwidth
                # compute >= 9 x comm keeps comm <= 10% of (compute + comm)
                needed[kind] = (comm, gpus * 9 * comm * GPU_FLOPS / flops)
            print(
                f"| {name} | {count / 1e6:.1f}M | {flops / 1e9:.3f} | {link} "
                f"| {ddp_bytes / 1e6:.0f} | {1000 * needed['ddp'][0]:.2f} "
                f"| {1000 * needed['fsdp'][0]:.2f} | {needed['ddp'][1]:,.0f} "
                f"| {needed['fsdp'][1]:,.0f} | {needed['ddp'][1] / seq:,.0f} x {seq} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["throughput", "memory", "scaling"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--memory-worker", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker)
        return
    print(machine())
    if args.only in (None, "throughput"):
        throughput(args.steps)
    if args.only in (None, "memory"):
        memory()
    if args.only in (None, "scaling"):
        scaling()


if __name__ == "__main__":
    main()

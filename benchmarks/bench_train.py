"""Training speed of lmlab against nanoGPT, measured side by side on the same machine.

Three tables:
1. matmul peaks (float32 and bfloat16) of this machine, the denominators of MFU;
2. time to quality: nanoGPT's CPU recipe on tinyshakespeare (char tokens, first 90% train, last
   10% validation) against lmlab's speedrun recipe, both as whole processes, with the validation
   loss each reaches (lmlab's measured at nanoGPT's context of 64 over the whole validation split);
3. throughput at nanoGPT's Shakespeare model shape (6 layers, 6 heads, width 384, context 256):
   tokens/s, ms/step, peak memory and MFU, float32 and bf16, lmlab and nanoGPT.

nanoGPT is not part of lmlab: clone karpathy/nanoGPT into a scratch folder and pass --nanogpt.
Run alone: on a 2-core machine any other busy process distorts the figures.

    python benchmarks/bench_train.py --data ../shared/data/tinyshakespeare/input.txt \
        --nanogpt /tmp/scratch/nanoGPT
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from timing import print_table, time_ms

NANOGPT_CPU_RECIPE = [
    "--device=cpu",
    "--compile=False",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]
LMLAB_SPEEDRUN = [
    "model.d_model=192",
    "model.n_layers=2",
    "model.n_heads=3",
    "data.seq_len=64",
    "train.batch_size=32",
    "train.optimizer=muon",
    "train.lr=4e-3",
    "train.muon_lr=0.03",
    "train.schedule=wsd",
    "train.decay_fraction=0.4",
    "train.warmup_steps=20",
    "train.max_time=0",
    "train.max_steps=230",
    "train.eval_interval=100000",
    "train.checkpoint_interval=100000",
    "train.eval_batches=4",
    "train.precision=fp32",
]
SHAPE = {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256}


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 8) -> float:
    """Best observed FLOP/s of a square matmul."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / (time_ms(lambda: a @ b, repeats, stat="best") / 1000)


def run_timed(command: list[str], cwd: Path | None = None) -> tuple[float, str]:
    """Wall seconds and combined output of a whole process."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout + done.stderr


def prepare_nanogpt_data(text: str, nanogpt: Path) -> None:
    """nanoGPT's shakespeare_char preparation (sorted characters, first 90% / last 10%)."""
    folder = nanogpt / "data" / "shakespeare_char"
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    cut = int(len(text) * 0.9)
    ids[:cut].tofile(folder / "train.bin")
    ids[cut:].tofile(folder / "val.bin")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    with open(folder / "meta.pkl", "wb") as handle:
        pickle.dump(meta, handle)


def nanogpt_val_loss(output: str) -> float:
    return float(re.findall(r"val loss ([0-9.]+)", output)[-1])


def nanogpt_iter_ms(output: str, skip: int = 2) -> float:
    times = [float(t) for t in re.findall(r"iter \d+: loss [0-9.]+, time ([0-9.]+)ms", output)]
    return float(np.median(times[skip:]))


def lmlab_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmlab", *args]


def time_to_quality(data: Path, nanogpt: Path | None, out: Path) -> list[list[str]]:
    """Rows of (system, recipe, whole-process seconds, validation loss)."""
    rows = []
    if nanogpt:
        seconds, output = run_timed(
            [sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_CPU_RECIPE],
            cwd=nanogpt,
        )
        loss = nanogpt_val_loss(output)
        rows.append(["nanoGPT", "CPU recipe (2000 iters, 12x64)", f"{seconds:.1f}", f"{loss:.4f}"])
    seconds, _ = run_timed(
        lmlab_command(
            "train",
            "--quiet",
            f"data.path={data}",
            "data.split=tail",
            "data.tokenizer=char",
            f"out_dir={out}",
            "name=speedrun",
            *LMLAB_SPEEDRUN,
        )
    )
    _, output = run_timed(
        lmlab_command(
            "eval",
            str(out / "speedrun"),
            "--seq-len",
            "64",
            "--batches",
            "100000",
            "--json",
        )
    )
    loss = json.loads(output.strip().splitlines()[-1])["loss"]
    recipe = f"speedrun ({' '.join(LMLAB_SPEEDRUN[:8])} ...)"
    rows.append(["lmlab", recipe, f"{seconds:.1f}", f"{loss:.4f}"])
    return rows


def lmlab_throughput(precision: str, steps: int, batch: int) -> dict:
    """Tokens/s of lmlab's model at nanoGPT's Shakespeare shape, measured in-process."""
    from lmlab.config.schema import ModelConfig
    from lmlab.model.lm import LanguageModel
    from lmlab.train.device import autocast

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=65, d_model=SHAPE["n_embd"], n_layers=SHAPE["n_layer"], n_heads=SHAPE["n_head"]
    )
    model = LanguageModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    context = torch.device("cpu")
    x = torch.randint(0, 65, (batch, SHAPE["block_size"]))

    def train_step() -> None:
        with autocast(context, precision):
            logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step = time_ms(train_step, steps, warmup=2) / 1000
    tokens = batch * SHAPE["block_size"]
    return {
        "step_ms": 1000 * step,
        "tokens_per_s": tokens / step,
        "flops_per_token": 3 * model.flops_per_token(SHAPE["block_size"]),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def nanogpt_throughput(nanogpt: Path, iters: int, batch: int) -> dict:
    """nanoGPT's own loop at its Shakespeare shape (on CPU it always runs float32)."""
    _, output = run_timed(
        [
            sys.executable,
            "train.py",
            "config/train_shakespeare_char.py",
            "--device=cpu",
            "--compile=False",
            f"--max_iters={iters}",
            "--eval_interval=100000",
            "--log_interval=1",
            f"--batch_size={batch}",
            "--dropout=0.0",
            "--eval_iters=1",
        ],
        cwd=nanogpt,
    )
    step = nanogpt_iter_ms(output) / 1000
    return {"step_ms": 1000 * step, "tokens_per_s": batch * SHAPE["block_size"] / step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="tinyshakespeare input.txt")
    parser.add_argument("--nanogpt", type=Path, help="a nanoGPT clone (scratch folder)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per throughput row")
    parser.add_argument("--batch", type=int, default=16, help="batch at the throughput shape")
    parser.add_argument(
        "--force-bf16", action="store_true", help="measure bf16 even where it is slow"
    )
    parser.add_argument("--skip", choices=["quality", "throughput"], action="append", default=[])
    args = parser.parse_args()
    text = args.data.read_text(encoding="utf-8")
    if args.nanogpt:
        prepare_nanogpt_data(text, args.nanogpt)

    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16, 1024, 2)}
    print_table(["matmul peak", "TFLOP/s"], [[n, f"{v / 1e12:.3f}"] for n, v in peaks.items()])
    print()

    if "quality" not in args.skip:
        with tempfile.TemporaryDirectory() as out:
            rows = time_to_quality(args.data, args.nanogpt, Path(out))
        print_table(["system", "recipe", "whole-process s", "val loss (nats/char)"], rows)
        print()

    if "throughput" not in args.skip:
        from lmlab.train.device import cpu_has_fast_bf16

        flops = None
        precisions = ("fp32", "bf16") if cpu_has_fast_bf16() or args.force_bf16 else ("fp32",)
        measured = []
        for precision in precisions:
            result = lmlab_throughput(precision, args.steps, args.batch)
            flops = result["flops_per_token"]
            measured.append(("lmlab", precision, result))
        if args.nanogpt:
            measured.append(
                ("nanoGPT", "fp32", nanogpt_throughput(args.nanogpt, args.steps + 2, args.batch))
            )
        rows = [
            [
                system,
                precision,
                f"{result['tokens_per_s']:.0f}",
                f"{result['step_ms']:.0f}",
                f"{result['tokens_per_s'] * flops / peaks['fp32']:.1%}",
                f"{result['tokens_per_s'] * flops / peaks['bf16']:.1%}",
            ]
            for system, precision, result in measured
        ]
        header = ["system", "precision", "tokens/s", "ms/step", "MFU vs fp32 peak"]
        print_table([*header, "MFU vs bf16 peak"], rows)
        print(
            f"\nlmlab peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
            f"training FLOPs/token at this shape {flops / 1e6:.1f}M (lmlab's count, used for "
            "both systems' MFU)"
        )


if __name__ == "__main__":
    main()

"""Weight-only quantisation of a trained run: file size, bits per byte, decode tokens/s.

Quantises RUN with ``lmlab quantize`` (int8, and int4 at each group size, the embedding and
head in int8; int4 g32 / g64 also with them in int4 and in float) into a temporary folder,
then for the float run and each quantised one reports the checkpoint's ``model.safetensors``
size, validation bits per byte exactly as ``lmlab eval`` computes them (same windows, the
run's precision), and greedy decode tokens/s at batch 1 and 8 (float32 activations, as
``lmlab generate``; each variant timed in turns with the others, median of ``--repeats``, on
the wall clock and on this process's CPU time). The whole table comes from one run, so the
speed columns can be rerun alone on a quiet machine.

    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src python bench_quantize.py ../runs/q-target \
        --batches 50 --tokens 100 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from timing import interleaved_wall_and_cpu_ms, machine, print_table

from lmlab.data.dataset import prepare_data
from lmlab.eval.evaluate import evaluate
from lmlab.model.generate import SamplingSettings, generate
from lmlab.train.checkpoint import MODEL_FILE
from lmlab.train.device import autocast, resolve_precision
from lmlab.train.quantize import quantize_run
from lmlab.train.run import load_run_checkpoint

VARIANTS = (
    ("float", None, 0, "float"),
    ("int8", "int8", 0, "int8"),
    ("int8, float embedding", "int8", 0, "float"),
    *((f"int4 g{group}", "int4", group, "int8") for group in (32, 64, 128)),
    *((f"int4 g{group}, int4 embedding", "int4", group, "int4") for group in (32, 64)),
    *((f"int4 g{group}, float embedding", "int4", group, "float") for group in (32, 64)),
)
"""(label, method, int4 group size, how the embedding and head are stored): lmlab quantize's
default is int8 (unlabelled rows); the labelled rows are ``--embeddings int4`` / ``float``."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a trained (float) run folder")
    parser.add_argument("--batches", type=int, default=50, help="validation batches")
    parser.add_argument("--tokens", type=int, default=100, help="new tokens per decode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{machine()}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f} at "
        f"the start (other jobs on this machine); run {args.run}"
    )
    with tempfile.TemporaryDirectory() as folder:
        runs = {}
        for index, (label, method, group, embeddings) in enumerate(VARIANTS):
            if method is None:
                runs[label] = Path(args.run)
                continue
            out = Path(folder) / str(index)
            result = quantize_run(args.run, out, method, group or 64, embeddings)
            if result["float_layers"]:
                print(f"{label}: kept in float (no group divides): {result['float_layers']}")
            if result["smaller_groups"]:
                smaller = ", ".join(f"{k} g{v}" for k, v in result["smaller_groups"].items())
                print(f"{label}: smaller groups (the asked one does not divide): {smaller}")
            runs[label] = out
        loaded = {label: load_run_checkpoint(path) for label, path in runs.items()}
        config, _, tokenizer, _ = loaded["float"]
        data, _ = prepare_data(config.data, tokenizer)
        precision = resolve_precision(config.train.precision, torch.device("cpu"))
        rows = {}
        for label, (_, model, _, checkpoint) in loaded.items():
            result = evaluate(
                model,
                data,
                batch_size=config.train.batch_size,
                seq_len=config.data.seq_len,
                max_batches=args.batches,
                device=torch.device("cpu"),
                autocast=autocast(torch.device("cpu"), precision),
                split="val",
            )
            rows[label] = [(checkpoint.path / MODEL_FILE).stat().st_size, result["bits_per_byte"]]
        greedy = SamplingSettings(temperature=0)
        for batch in (1, 8):
            generator = torch.Generator().manual_seed(batch)
            prompt = torch.randint(0, tokenizer.vocab_size, (batch, 16), generator=generator)
            fns = {
                label: (lambda m=model, p=prompt: generate(m, p, args.tokens, greedy))
                for label, (_, model, _, _) in loaded.items()
            }
            ms = interleaved_wall_and_cpu_ms(fns, repeats=args.repeats, warmup=1)
            for label, (wall, cpu) in ms.items():
                rows[label] += [batch * args.tokens / wall * 1000, batch * args.tokens / cpu * 1000]
    float_bytes, float_bpb = rows["float"][:2]
    print(f"validation: {args.batches} batches of the run's windows, {precision} as lmlab eval")
    print_table(
        [
            "weights",
            "model.safetensors",
            "smaller",
            "bits/byte",
            "vs float",
            "tok/s b=1 (wall)",
            "tok/CPU-s b=1",
            "tok/s b=8 (wall)",
            "tok/CPU-s b=8",
        ],
        (
            (
                label,
                f"{size / 1024:.0f} KiB",
                f"{float_bytes / size:.2f}x",
                f"{bpb:.4f}",
                f"{(bpb - float_bpb) / float_bpb:+.2%}",
                *(f"{speed:.0f}" for speed in speeds),
            )
            for label, (size, bpb, *speeds) in rows.items()
        ),
        "lrrrrrrrr",
    )


if __name__ == "__main__":
    main()

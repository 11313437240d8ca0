"""Speculative decoding on this CPU: acceptance rate and tokens/s against plain decoding.

Batch 1, float32, the target run decoding ``--tokens`` new tokens after each prompt, plainly
(``stream_tokens``) and speculatively with each draft (another run, and ``self:N`` early exits)
at each ``--draft-tokens`` k; greedy and sampled. Every variant is timed in turns with the
others, median of ``--repeats``, on the wall clock and on this process's CPU time (one thread:
the CPU time leaves out the waits for a core on a shared machine).

    python benchmarks/bench_speculative.py runs/spec-target --draft runs/spec-draft \\
        --draft self:1 --draft self:2 --draft-tokens 2,4,6
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch
from timing import interleaved_wall_and_cpu_ms, print_table

from lmlab.model.generate import SamplingSettings, stream_tokens
from lmlab.model.speculative import SpeculativeStats, stream_speculative
from lmlab.train.run import load_draft, load_trained_model

PROMPTS = ("ROMEO:\n", "First Citizen:\nBefore we proceed", "KING HENRY")


def decoding(target, draft, prompts, tokens, settings, k, stats, label) -> Callable[[], None]:
    """One timed call: decode ``tokens`` after each prompt, plainly (``draft`` None) or
    speculatively, recording the speculative counts of the last call under ``label``."""

    def run() -> None:
        stats[label] = SpeculativeStats()
        for prompt in prompts:
            if draft is None:
                stream = stream_tokens(target, prompt, tokens, settings)
            else:
                stream = stream_speculative(
                    target, draft, prompt, tokens, settings, k, stats=stats[label]
                )
            for _ in stream:
                pass

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="run folder of the target model")
    parser.add_argument("--draft", action="append", required=True, help="run folder or self:N")
    parser.add_argument("--draft-tokens", default="2,4,6", help="k values, comma-separated")
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per prompt")
    parser.add_argument("--temperatures", default="0,0.8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, target, tokenizer, _ = load_trained_model(args.target)
    drafts = {spec: load_draft(spec, target, tokenizer) for spec in args.draft}
    prompts = [torch.tensor([tokenizer.encode_array(p).tolist()]) for p in PROMPTS]
    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s), "
        f"torch {torch.__version__}; target {args.target} "
        f"({target.num_parameters() / 1e6:.2f}M parameters), {args.tokens} new tokens x "
        f"{len(prompts)} prompts, batch 1, float32"
    )
    for spec, draft in drafts.items():
        size = sum(p.numel() for p in draft.parameters())
        print(f"draft {spec}: {size / 1e6:.2f}M parameters (shared with the target if self:N)")
    ks = [int(k) for k in args.draft_tokens.split(",")]
    rows = []
    for temperature in (float(t) for t in args.temperatures.split(",")):
        settings = SamplingSettings(temperature=temperature)
        stats: dict[str, SpeculativeStats] = {}
        fns = {"plain": decoding(target, None, prompts, args.tokens, settings, 0, stats, "plain")}
        for (spec, draft), k in itertools.product(drafts.items(), ks):
            label = f"{spec} k={k}"
            fns[label] = decoding(target, draft, prompts, args.tokens, settings, k, stats, label)
        ms = interleaved_wall_and_cpu_ms(fns, repeats=args.repeats, warmup=1)
        total = args.tokens * len(prompts)
        for label, (wall, cpu) in ms.items():
            counts = stats[label] if label != "plain" else None
            rows.append(
                (
                    f"{temperature:g}",
                    label,
                    f"{counts.acceptance_rate:.2f}" if counts else "-",
                    f"{counts.tokens_per_round:.2f}" if counts else "1.00",
                    f"{total / wall * 1000:.0f}",
                    f"{ms['plain'][0] / wall:.2f}x",
                    f"{total / cpu * 1000:.0f}",
                    f"{ms['plain'][1] / cpu:.2f}x",
                )
            )
    print_table(
        [
            "temperature",
            "decoding",
            "acceptance",
            "tokens/verify",
            "tokens/s (wall)",
            "speed-up (wall)",
            "tokens/CPU-s",
            "speed-up (CPU)",
        ],
        rows,
        "llrrrrrr",
    )


if __name__ == "__main__":
    main()

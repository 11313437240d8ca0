"""Speculative decoding on this CPU: acceptance rate and tokens/s against plain decoding.

Batch 1, float32, the target run decoding ``--tokens`` new tokens after each prompt, plainly
(``stream_tokens``) and speculatively with each draft (another run, and ``self:N`` early exits)
at each ``--draft-tokens`` k; greedy and sampled. Every variant is timed in turns with the
others, median of ``--repeats``, on the wall clock and on this process's CPU time (one thread:
the CPU time leaves out the waits for a core on a shared machine). Every decoding runs under
``inference_mode``, plain decoding included, so the speed-up is the algorithm's alone.

First a table of the models: parameters, validation bits per byte (the same windows of the
target run's validation split for all) and the CPU cost of one cached one-token forward, which
with the acceptance rate predicts the speed-up: tokens per verification divided by
``k * draft cost + verification cost`` (in target forwards). After the main table, the start
of each temperature's plain output of the first prompt and the share of its 20-character
windows that repeat an earlier one (how much the decoding loops).

    python benchmarks/bench_speculative.py runs/spec-target --draft runs/spec-draft \\
        --draft self:1 --draft self:2 --draft-tokens 2,4,6
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch
from timing import interleaved_wall_and_cpu_ms, print_table

from lmlab.data.dataset import prepare_data
from lmlab.eval.evaluate import evaluate
from lmlab.model.generate import SamplingSettings, stream_tokens
from lmlab.model.speculative import Draft, SpeculativeStats, stream_speculative
from lmlab.train.run import load_draft, load_trained_model

PROMPTS = ("ROMEO:\n", "First Citizen:\nBefore we proceed", "KING HENRY")
LOOP_WINDOW = 20


def decoding(target, draft, prompts, tokens, settings, k, confidence, stats, label, outputs):
    """One timed call: decode ``tokens`` after each prompt, plainly (``draft`` None) or
    speculatively (up to ``k`` drafts a round, fewer below ``confidence``), recording the
    speculative counts and the new tokens of the last call under ``label``."""

    @torch.inference_mode()
    def run() -> None:
        stats[label] = SpeculativeStats()
        outputs[label] = []
        for prompt in prompts:
            if draft is None:
                stream = stream_tokens(target, prompt, tokens, settings)
            else:
                stream = stream_speculative(
                    target, draft, prompt, tokens, settings, k, 0, stats[label], confidence
                )
            outputs[label].append([int(token) for token in stream])

    return run


def one_token_forward(model: Draft, vocab: int, context: int = 100) -> Callable[[], None]:
    """20 cached one-token forwards after a ``context``-token prefill (batch 1)."""

    @torch.inference_mode()
    def run() -> None:
        state = model(torch.randint(0, vocab, (1, context)), None)[1]
        token = torch.zeros(1, 1, dtype=torch.long)
        for _ in range(20):
            model(token, state)

    return run


def repeated_share(ids: list[int], window: int = LOOP_WINDOW) -> float:
    """Share of ``window``-token windows equal to an earlier window of the same output."""
    seen, repeats = set(), 0
    for i in range(len(ids) - window + 1):
        piece = tuple(ids[i : i + window])
        repeats += piece in seen
        seen.add(piece)
    return repeats / max(len(ids) - window + 1, 1)


def model_rows(target_spec, target, drafts, config, tokenizer, eval_batches, repeats):
    """Rows of the models table: size, validation bits/byte and one-token forward cost."""
    data, _ = prepare_data(config.data, tokenizer)
    models: dict[str, Draft] = {target_spec: target} | drafts
    vocab = target.cfg.vocab_size
    ms = interleaved_wall_and_cpu_ms(
        {spec: one_token_forward(model, vocab) for spec, model in models.items()}, repeats
    )
    target_size = target.num_parameters()
    for spec, model in models.items():
        size = sum(p.numel() for p in model.parameters())
        layers = model.n_layers if spec.startswith("self:") else len(model.blocks)
        val = evaluate(
            model,
            data,
            batch_size=config.train.batch_size,
            seq_len=config.data.seq_len,
            max_batches=eval_batches,
            device=torch.device("cpu"),
        )
        model.eval()  # evaluate restores an early exit's training flag onto the whole target
        yield (
            spec,
            f"{layers} x {model.cfg.d_model}",
            f"{size / 1e6:.2f}M" + (" (shared)" if spec.startswith("self:") else ""),
            f"{target_size / size:.1f}x" if spec != target_spec else "1.0x",
            f"{val['bits_per_byte']:.3f}",
            f"{ms[spec][1] / 20:.2f}",
            f"{ms[spec][1] / ms[target_spec][1]:.2f}",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="run folder of the target model")
    parser.add_argument("--draft", action="append", required=True, help="run folder or self:N")
    parser.add_argument("--draft-tokens", default="2,4,6", help="k values, comma-separated")
    parser.add_argument(
        "--draft-confidence",
        default="0",
        help="draft_confidence values, comma-separated (0: always draft k tokens)",
    )
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per prompt")
    parser.add_argument("--temperatures", default="0,0.8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--eval-batches", type=int, default=60, help="validation batches per model (bits/byte)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config, target, tokenizer, _ = load_trained_model(args.target)
    drafts = {spec: load_draft(spec, target, tokenizer) for spec in args.draft}
    prompts = [torch.tensor([tokenizer.encode_array(p).tolist()]) for p in PROMPTS]
    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s), "
        f"torch {torch.__version__}; {args.tokens} new tokens x {len(prompts)} prompts, batch 1, "
        f"float32; bits/byte on {args.eval_batches} validation batches of "
        f"{config.train.batch_size} x {config.data.seq_len} tokens\n"
    )
    print_table(
        [
            "model",
            "layers x width",
            "parameters",
            "fewer than target",
            "val bits/byte",
            "one-token forward ms (CPU)",
            "cost vs target",
        ],
        model_rows(args.target, target, drafts, config, tokenizer, args.eval_batches, args.repeats),
        "lllrrrr",
    )
    print()
    ks = [int(k) for k in args.draft_tokens.split(",")]
    confidences = [float(c) for c in args.draft_confidence.split(",")]
    rows, samples = [], []
    for temperature in (float(t) for t in args.temperatures.split(",")):
        settings = SamplingSettings(temperature=temperature)
        stats: dict[str, SpeculativeStats] = {}
        outputs: dict[str, list[list[int]]] = {}
        fns = {
            "plain": decoding(
                target, None, prompts, args.tokens, settings, 0, 0, stats, "plain", outputs
            )
        }
        for (spec, draft), k, confidence in itertools.product(drafts.items(), ks, confidences):
            label = f"{spec} k={k}" + (f" c={confidence:g}" if confidence else "")
            fns[label] = decoding(
                target, draft, prompts, args.tokens, settings, k, confidence, stats, label, outputs
            )
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
        plain = outputs["plain"]
        loops = sum(repeated_share(ids) for ids in plain) / len(plain)
        text = tokenizer.decode(plain[0])[:160]
        samples.append(
            f"temperature {temperature:g}: {loops:.0%} of the plain outputs' {LOOP_WINDOW}-token "
            f"windows repeat an earlier one; {PROMPTS[0]!r} -> {text!r}"
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
    print()
    print("\n".join(samples))


if __name__ == "__main__":
    main()

"""Compare every registered token mixer on speed and decode memory; prints Markdown tables.

(a) Training throughput: tokens/s of forward + backward + AdamW step of a small
    ``LanguageModel`` (default 4 layers, width 256) per mixer, one column per ``--dtype``
    (``bf16`` runs under autocast, as training does).
(b) Length scaling: forward + backward time of ONE mixer layer at growing T beside the
    ``attention`` mixer of the same width and heads (timed in turns), and the crossover length
    from which the mixer stays faster than attention; then, at ``--breakdown-length``, how much of
    each layer's time its projections take.
(c) Decode: ms per generated token and bytes of state of the model as the context grows
    (the context is prefilled, then ``--decode-steps`` single-token steps are timed).

(b) and (c) run in float32. ``--quick`` shrinks everything for a smoke run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
import yaml
from timing import interleaved_ms, print_table, time_ms
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.registry import build_token_mixer, token_mixer_names
from lmlab.model.cache import ModelState
from lmlab.model.lm import LanguageModel
from lmlab.train.device import autocast

VOCAB = 256
BASELINE = "attention"
PRECISIONS = {"float32": "fp32", "fp32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mixers", default="", help="comma-separated names (default: all)")
    parser.add_argument("--sections", default="train,scaling,decode")
    parser.add_argument("--dtype", default="float32,bf16", help="columns of (a): float32,bf16")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="(a) batch size")
    parser.add_argument("--seq-len", type=int, default=256, help="(a) sequence length")
    parser.add_argument("--steps", type=int, default=5, help="(a) timed optimiser steps")
    parser.add_argument("--lengths", default="256,512,1024,2048,4096,8192", help="(b) T values")
    parser.add_argument("--layer-batch", type=int, default=1, help="(b) batch size")
    parser.add_argument("--repeats", type=int, default=3, help="(b) timed runs (median)")
    parser.add_argument(
        "--breakdown-length",
        type=int,
        default=1024,
        help="(b) T at which each layer's time is split into projections and the rest (0: off)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="(b, c) skip the longer sizes of a mixer once one run takes more seconds than this",
    )
    parser.add_argument("--contexts", default="1024,2048,4096,8192,16384", help="(c) contexts")
    parser.add_argument("--decode-steps", type=int, default=32, help="(c) timed tokens")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--mixer-options",
        default="",
        help="mixer settings, comma-separated, e.g. bdh.mlp_multiplier=4 (default: each mixer's)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    args = parser.parse_args()
    unknown = set(args.dtype.split(",")) - set(PRECISIONS)
    if unknown:
        parser.error(f"--dtype {','.join(sorted(unknown))} is unknown; use float32 and/or bf16")
    args.mixer_options = mixer_options(parser, args.mixer_options)
    if args.quick:
        args.d_model, args.n_heads, args.n_layers = 64, 2, 2
        args.batch, args.seq_len, args.steps = 2, 32, 1
        args.lengths, args.layer_batch, args.repeats = "64,128", 1, 1
        args.breakdown_length = 128
        args.contexts, args.decode_steps = "64,128", 2
    return args


def mixer_options(parser: argparse.ArgumentParser, text: str) -> dict[str, dict]:
    """``bdh.mlp_multiplier=4,gla.chunk_size=32`` -> ``{"bdh": {"mlp_multiplier": 4}, ...}``."""
    options: dict[str, dict] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        mixer, dot, name = key.partition(".")
        if not (sep and dot and mixer and name):
            parser.error(f"--mixer-options takes mixer.setting=value items, got {item!r}")
        options.setdefault(mixer, {})[name] = yaml.safe_load(value)
    return options


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def model_config(args: argparse.Namespace, mixer: str, n_layers: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB,
        d_model=args.d_model,
        n_heads=args.n_heads,
        n_layers=n_layers,
        mixer=mixer,
        mixer_options=args.mixer_options,
    )


def train_tokens_per_second(args: argparse.Namespace, mixer: str, precision: str) -> float:
    torch.manual_seed(0)
    model = LanguageModel(model_config(args, mixer, args.n_layers))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq_len + 1))

    def step() -> None:
        with autocast(torch.device("cpu"), precision):
            logits, _ = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), tokens[:, 1:].flatten()
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return args.batch * args.seq_len / (time_ms(step, args.steps, stat="mean") / 1000)


def layer_step(args: argparse.Namespace, mixer: str, length: int) -> Callable[[], None]:
    """Forward + backward of one mixer layer on ``[layer_batch, length, d_model]``."""
    torch.manual_seed(0)
    layer = build_token_mixer(mixer, model_config(args, mixer, 1), layer_idx=0)
    x = torch.randn(args.layer_batch, length, args.d_model, requires_grad=True)

    def run() -> None:
        y, _ = layer(x)
        y.square().mean().backward()

    return run


def projections_step(args: argparse.Namespace, mixer: str, length: int) -> Callable[[], None]:
    """Forward + backward of every ``nn.Linear`` of one mixer layer, each alone on
    ``[layer_batch, length, in_features]``: the matmuls the layer spends on every token whatever
    its sequence mixing (all of these mixers apply their linear layers per token or, Hyena's
    filter network, per position)."""
    layer = build_token_mixer(mixer, model_config(args, mixer, 1), layer_idx=0)
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    shape = (args.layer_batch, length)
    inputs = [torch.randn(*shape, m.in_features, requires_grad=True) for m in linears]
    grads = [torch.randn(*shape, m.out_features) for m in linears]

    def run() -> None:
        for linear, x, grad in zip(linears, inputs, grads, strict=True):
            linear(x).backward(grad)

    return run


def decode_costs(
    args: argparse.Namespace, mixer: str, contexts: list[int]
) -> list[tuple[float, int] | None]:
    """(ms per token, state bytes) after prefilling each context; the context grows by
    feeding the missing tokens as one more segment, so each level reuses the last state."""
    torch.manual_seed(0)
    model = LanguageModel(model_config(args, mixer, args.n_layers)).eval()
    state: ModelState | None = None
    results: list[tuple[float, int] | None] = []
    slow = False
    with torch.no_grad():
        for context in contexts:
            if slow:
                results.append(None)
                continue
            position = 0 if state is None else state.position
            start = time.perf_counter()
            prompt = torch.randint(0, VOCAB, (1, max(context - position, 1)))
            logits, state = model(prompt, state)
            slow = time.perf_counter() - start > args.budget
            token = logits[:, -1:].argmax(-1)

            def decode_step() -> None:
                nonlocal logits, state, token
                logits, state = model(token, state)
                token = logits[:, -1:].argmax(-1)

            ms = time_ms(decode_step, args.decode_steps, warmup=0, stat="mean")
            results.append((ms, state.nbytes()))
    return results


def progress(mixer: str) -> None:
    print(f"  measured {mixer}", file=sys.stderr, flush=True)


def crossover(lengths: list[int], mine: list[float | None], base: list[float | None]) -> str:
    """The smallest measured T from which the mixer is faster than attention at every longer
    measured T."""
    found = "none"
    for length, a, b in reversed(list(zip(lengths, mine, base, strict=True))):
        if a is None or (b is not None and a >= b):  # None: skipped for being over budget
            break
        found = str(length)
    return found


def section_train(args: argparse.Namespace, mixers: list[str]) -> None:
    precisions = [PRECISIONS[d] for d in args.dtype.split(",")]
    rows = []
    for mixer in mixers:
        params = LanguageModel(model_config(args, mixer, args.n_layers)).num_parameters()
        cells = [f"{train_tokens_per_second(args, mixer, p):,.0f}" for p in precisions]
        rows.append([mixer, f"{params / 1e6:.2f}M", *cells])
        progress(mixer)
    print(
        f"\n### (a) Training tokens/s: {args.n_layers} layers, d_model {args.d_model}, "
        f"{args.n_heads} heads, batch {args.batch} x {args.seq_len}, forward+backward+AdamW\n"
    )
    print_table(["mixer", "params", *[f"{p} tok/s" for p in precisions]], rows)


def section_scaling(args: argparse.Namespace, mixers: list[str]) -> None:
    lengths = int_list(args.lengths)
    names = [BASELINE, *[m for m in mixers if m != BASELINE]]
    times: dict[str, list[float | None]] = {mixer: [] for mixer in names}
    for length in lengths:
        # A mixer over budget at a shorter length is skipped from then on.
        steps = {
            m: layer_step(args, m, length)
            for m in names
            if not times[m] or (times[m][-1] is not None and times[m][-1] <= args.budget)
        }
        measured = interleaved_ms(steps, args.repeats)
        for mixer in names:
            ms = measured.get(mixer)
            times[mixer].append(None if ms is None else ms / 1000)
        print(f"  measured T={length}", file=sys.stderr, flush=True)
    rows = []
    for mixer in names:
        cells = ["-" if t is None else f"{1000 * t:.1f}" for t in times[mixer]]
        cross = "-" if mixer == BASELINE else crossover(lengths, times[mixer], times[BASELINE])
        last, base = times[mixer][-1], times[BASELINE][-1]
        ratio = "-" if last is None or base is None else f"{last / base:.2f}"
        rows.append([mixer, *cells, cross, ratio])
    print(
        f"\n### (b) One layer forward+backward ms (float32, batch {args.layer_batch}, "
        f"d_model {args.d_model}, {args.n_heads} heads; the layers timed in turns, median of "
        f"{args.repeats}); crossover = shortest T from which the mixer beats {BASELINE} at every "
        "longer T; '-' = skipped (over --budget)\n"
    )
    header = [
        "mixer",
        *[f"T={n}" for n in lengths],
        "crossover T",
        f"vs {BASELINE} at T={lengths[-1]}",
    ]
    print_table(header, rows)
    if args.breakdown_length:
        section_breakdown(args, names, args.breakdown_length)


def section_breakdown(args: argparse.Namespace, names: list[str], length: int) -> None:
    """Split each layer's time at one length into its projections (every ``nn.Linear``) and
    the rest (sequence mixing, convolutions, gates, norms): when a mixer's projections alone
    take about as long as the whole attention layer, no faster sequence mixing can bring its
    crossover down to that length."""
    steps = {}
    for mixer in names:
        steps[mixer] = layer_step(args, mixer, length)
        steps[f"{mixer} projections"] = projections_step(args, mixer, length)
    measured = interleaved_ms(steps, args.repeats)
    attention = measured[BASELINE]
    rows = []
    for mixer in names:
        layer, projections = measured[mixer], measured[f"{mixer} projections"]
        rows.append(
            [
                mixer,
                f"{layer:.1f}",
                f"{projections:.1f}",
                f"{layer - projections:.1f}",
                f"{layer / attention:.2f}",
                f"{projections / attention:.2f}",
            ]
        )
    print(
        f"\n### (b) Where one layer's time goes at T={length} (ms, forward+backward, timed in "
        f"turns, median of {args.repeats}); projections = every nn.Linear of the layer alone\n"
    )
    header = ["mixer", "layer", "projections", "rest", "layer / attn", "projections / attn"]
    print_table(header, rows, align="lrrrrr")


def section_decode(args: argparse.Namespace, mixers: list[str]) -> None:
    contexts = int_list(args.contexts)
    names = [BASELINE, *[m for m in mixers if m != BASELINE]]
    costs = {}
    for mixer in names:
        costs[mixer] = decode_costs(args, mixer, contexts)
        progress(mixer)
    header = ["mixer", *[f"ctx {n}" for n in contexts]]
    print(
        f"\n### (c) Decode ms/token (float32, batch 1, {args.n_layers} layers, d_model "
        f"{args.d_model}; mean of {args.decode_steps} steps after prefilling the context)\n"
    )
    print_table(
        header, [[m, *["-" if c is None else f"{c[0]:.2f}" for c in costs[m]]] for m in names]
    )
    print("\n### (c) Decode state (KiB, all layers; attention's cache grows by doubling)\n")
    print_table(
        header,
        [[m, *["-" if c is None else f"{c[1] / 1024:,.0f}" for c in costs[m]]] for m in names],
    )


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    available = token_mixer_names()
    mixers = args.mixers.split(",") if args.mixers else available
    unknown = sorted(set(mixers) - set(available))
    if unknown:
        raise LmlabError(
            f"unknown mixer(s) {', '.join(unknown)}; available: {', '.join(available)}"
        )
    buildable = []
    for mixer in mixers:
        try:
            build_token_mixer(mixer, model_config(args, mixer, 1), layer_idx=0)
            buildable.append(mixer)
        except LmlabError as error:
            print(f"skipping {mixer}: {error}", file=sys.stderr)
    mixers = buildable
    sections = {"train": section_train, "scaling": section_scaling, "decode": section_decode}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, mixers: {', '.join(mixers)}"
    )
    for name in args.sections.split(","):
        if name not in sections:
            raise LmlabError(f"unknown section {name!r}; use {', '.join(sections)}")
        sections[name](args, mixers)


if __name__ == "__main__":
    main()

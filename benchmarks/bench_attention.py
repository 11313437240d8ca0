"""Attention-family decode costs; prints Markdown tables.

(a) Cache bytes per token: MLA (DeepSeek-V2 ratios) vs MHA/GQA/MQA at the same width, from each
    mixer's ``cache_bytes_per_token`` and checked against a measured prefill cache.
(b) Sliding-window decode: model state bytes and ms per token as the context grows, beside full
    attention (the window's state stays flat).
(c) Top-k sparse decode: exact vs top-k decode of a briefly trained tiny model (embedded
    Shakespeare, char tokens): max abs logit difference and next-token loss gap.

``--quick`` shrinks everything for a smoke run.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
from timing import print_table, time_ms

from lmlab.config.schema import ModelConfig
from lmlab.layers.attention import sparse_decode_gap
from lmlab.layers.registry import build_token_mixer
from lmlab.model.cache import ModelState
from lmlab.model.lm import LanguageModel


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--contexts", default="256,512,1024,2048")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--top-k", default="4,16,64")
    parser.add_argument("--quick", action="store_true")
    return parser.parse_args()


def cache_table(d_model: int, heads: int) -> None:
    tokens = 32
    x = torch.randn(1, tokens, d_model)
    kinds = [("attention", kv) for kv in sorted({heads, max(heads // 4, 1), 1}, reverse=True)]
    rows = []
    for name, kv in [*kinds, ("mla", 0)]:
        cfg = ModelConfig(d_model=d_model, n_heads=heads, n_kv_heads=kv)
        mixer = build_token_mixer(name, cfg, 0)
        with torch.no_grad():
            _, state = mixer(x)
        measured = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        rows.append([name, kv or "latent", mixer.cache_bytes_per_token(), measured // tokens])
    print_table(["mixer", "kv heads", "bytes/token (fp32)", "measured"], rows)


def window_table(d_model: int, heads: int, window: int, contexts: list[int], steps: int) -> None:
    models = {}
    for label, options in (("full", {}), ("window", {"window": window})):
        torch.manual_seed(0)
        cfg = ModelConfig(
            vocab_size=256,
            d_model=d_model,
            n_layers=2,
            n_heads=heads,
            mixer_options={"attention": options},
        )
        models[label] = LanguageModel(cfg).eval()
    print()
    header = ["context", "full: state bytes", "full: ms/token", "window: state bytes"]
    print_table([*header, "window: ms/token"], window_rows(models, contexts, steps))


def window_rows(
    models: dict[str, LanguageModel], contexts: list[int], steps: int
) -> Iterator[list[object]]:
    """One row per context, produced as measured: state bytes and ms/token of each model."""
    for context in contexts:
        cells: list[object] = [context]
        tokens = torch.randint(0, 256, (1, context + steps))
        for model in models.values():
            ms, state = decode_ms(model, tokens, context, steps)
            cells += [state.nbytes(), f"{ms:.2f}"]
        yield cells


def decode_ms(
    model: LanguageModel, tokens: torch.Tensor, context: int, steps: int
) -> tuple[float, ModelState]:
    """Prefill ``context`` tokens, then feed ``steps`` more one at a time: (ms per token, the
    final state)."""
    with torch.no_grad():
        _, state = model(tokens[:, :context])
        upcoming = iter(tokens[:, context:].split(1, dim=1))

        def decode_step() -> None:
            nonlocal state
            _, state = model(next(upcoming), state)

        ms = time_ms(decode_step, steps, warmup=0, stat="mean")
    return ms, state


def sparse_table(train_steps: int, top_ks: list[int], context: int) -> None:
    from lmlab.data.corpus import load_embedded_corpus

    text = load_embedded_corpus("modern")[0].text[:200_000]
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text[:100_000]])
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=len(vocab), d_model=64, n_layers=2, n_heads=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(train_steps):
        starts = torch.randint(0, len(ids) - 129, (16,), generator=generator)
        batch = torch.stack([ids[s : s + 129] for s in starts])
        logits, _ = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    tokens = torch.stack([ids[s : s + context] for s in (1000, 50_000)])
    rows = []
    for k in top_ks:
        gap = sparse_decode_gap(model, tokens, prefix=context // 4, top_k=k)
        rows.append(
            [
                k,
                f"{gap['max_abs_logit_diff']:.4f}",
                f"{gap['loss_exact']:.4f}",
                f"{gap['loss_sparse']:.4f}",
                f"{gap['loss_gap']:+.4f}",
            ]
        )
    print()
    print_table(["top-k", "max abs logit diff", "loss exact", "loss sparse", "loss gap"], rows)


def main() -> None:
    args = parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    top_ks = [int(k) for k in args.top_k.split(",")]
    if args.quick:
        args.d_model, args.window, args.decode_steps, args.train_steps = 64, 16, 2, 5
        contexts, top_ks = [16, 32, 64], [2, 8]
    cache_table(args.d_model, args.heads)
    window_table(args.d_model, args.heads, args.window, contexts, args.decode_steps)
    sparse_table(args.train_steps, top_ks, 64 if args.quick else 256)


if __name__ == "__main__":
    main()

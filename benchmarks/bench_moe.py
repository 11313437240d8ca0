"""Mixture of experts against the dense SwiGLU MLP of the same active width; prints Markdown.

(a) Cost: parameters, training FLOPs per token (3x forward) and training tokens/s of the MoE
    (``--experts`` experts, top-``--top-k``, each ``mlp_hidden / top_k`` wide) against the dense
    MLP, for one channel-mixer layer (forward + backward) and for a whole ``LanguageModel``
    (forward + backward + AdamW). Targets: ~4x parameters, <= 1.3x FLOPs, >= 0.7x tokens/s.
(b) Balance: a short training run on the embedded Shakespeare corpus (char tokens) for each
    balancing recipe (loss-free bias, auxiliary loss, none); the coefficient of variation (CV)
    of the expert load, averaged over layers: per step over the first and the last ``--tail``
    steps (target <= 0.1 loss-free; it includes batch-to-batch noise, which shrinks with the
    batch), and of the load summed over the last ``--tail`` steps (the systematic imbalance).

Run alone (2 shared cores distort timings):

    .venv/bin/python benchmarks/bench_moe.py
    .venv/bin/python benchmarks/bench_moe.py --quick     # smoke run, tiny sizes
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import torch
import torch.nn.functional as F
from timing import print_table, time_ms

from lmlab.config.schema import DataConfig, ModelConfig
from lmlab.data.dataset import prepare_data, random_batch
from lmlab.data.tokens import TokenData
from lmlab.layers.registry import build_channel_mixer
from lmlab.model.lm import LanguageModel

VOCAB = 256


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="cost,balance")
    parser.add_argument("--router", default="topk", help="topk, switch, top_p, expert_choice")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="(a) timed runs (median)")
    parser.add_argument("--train-d-model", type=int, default=128, help="(b) model width")
    parser.add_argument("--train-batch", type=int, default=16, help="(b) batch size")
    parser.add_argument("--train-seq-len", type=int, default=128, help="(b) sequence length")
    parser.add_argument("--steps", type=int, default=400, help="(b) training steps")
    parser.add_argument("--tail", type=int, default=50, help="(b) steps the final CV averages")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--bias-rate",
        type=float,
        default=3e-3,
        help="(b) loss-free update rate (DeepSeek-V3's 1e-3 suits long runs; 3e-3 balances "
        "within a few hundred steps)",
    )
    parser.add_argument("--aux-coef", type=float, default=0.01, help="(b) aux-loss coefficient")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    args = parser.parse_args()
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections {','.join(sorted(unknown))} is unknown; use cost and/or balance")
    if args.quick:
        args.d_model, args.n_layers, args.batch, args.seq_len, args.repeats = 64, 2, 2, 32, 1
        args.train_d_model, args.train_batch, args.train_seq_len = 32, 4, 32
        args.steps, args.tail = 12, 4
    return args


def model_config(args: argparse.Namespace, channel: str, d_model: int, **moe) -> ModelConfig:
    options = {"router": args.router, "n_experts": args.experts, "top_k": args.top_k, **moe}
    return ModelConfig(
        vocab_size=VOCAB,
        d_model=d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        channel_mixer=channel,
        mixer_options={"moe": options},
    )


def layer_cost(args: argparse.Namespace, channel: str) -> tuple[int, float, float]:
    """(parameters, training FLOPs per token, tokens/s of forward + backward) of one layer."""
    torch.manual_seed(0)
    cfg = model_config(args, channel, args.d_model)
    layer = build_channel_mixer(channel, cfg, layer_idx=0).train()
    x = torch.randn(args.batch, args.seq_len, args.d_model, requires_grad=True)

    def run() -> None:
        layer(x).square().mean().backward()

    params = sum(p.numel() for p in layer.parameters())
    forward = (
        layer.flops_per_token()
        if hasattr(layer, "flops_per_token")
        else 2 * sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    )
    tokens = args.batch * args.seq_len
    return params, 3 * forward, tokens / (time_ms(run, args.repeats) / 1000)


def model_cost(args: argparse.Namespace, channel: str) -> tuple[int, float, float]:
    """(parameters, training FLOPs per token, tokens/s of a full AdamW step) of the model."""
    torch.manual_seed(0)
    model = LanguageModel(model_config(args, channel, args.d_model)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq_len + 1))

    def step() -> None:
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        aux = model.auxiliary_loss()
        (loss if aux is None else loss + aux).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.pop_statistics()

    flops = 3 * model.flops_per_token(args.seq_len)
    seconds = time_ms(step, args.repeats) / 1000
    return model.num_parameters(), flops, args.batch * args.seq_len / seconds


def section_cost(args: argparse.Namespace) -> None:
    rows = []
    for scope, measure in (("layer", layer_cost), ("model", model_cost)):
        dense = measure(args, "swiglu")
        moe = measure(args, "moe")
        for name, (params, flops, speed) in (("dense swiglu", dense), ("moe", moe)):
            rows.append(
                [
                    scope,
                    name,
                    f"{params / 1e6:.3f}M",
                    f"{params / dense[0]:.2f}x",
                    f"{flops / 1e6:.3f}M",
                    f"{flops / dense[1]:.3f}x",
                    f"{speed:,.0f}",
                    f"{speed / dense[2]:.2f}x",
                ]
            )
        print(f"  measured {scope}", file=sys.stderr, flush=True)
    cfg = model_config(args, "moe", args.d_model)
    expert_width = build_channel_mixer("moe", cfg, layer_idx=0).expert_hidden
    print(
        f"\n### (a) MoE ({args.router}, {args.experts} experts, top-{args.top_k}, expert width "
        f"{expert_width}) vs dense SwiGLU (width {cfg.resolved_mlp_hidden}): d_model "
        f"{args.d_model}, batch {args.batch} x {args.seq_len}, float32; layer = forward + "
        f"backward of one channel mixer, model = {args.n_layers}-layer LM with AdamW\n"
    )
    header = ["scope", "mixer", "params", "vs dense", "train FLOPs/token", "vs dense"]
    print_table([*header, "tokens/s", "vs dense"], rows)


def balancing_recipes(args: argparse.Namespace) -> dict[str, dict]:
    return {
        f"loss-free bias (rate {args.bias_rate:g})": {
            "aux_loss_coef": 0.0,
            "bias_update_rate": args.bias_rate,
        },
        f"aux loss (coef {args.aux_coef:g})": {
            "aux_loss_coef": args.aux_coef,
            "bias_update_rate": 0.0,
        },
        "none": {"aux_loss_coef": 0.0, "bias_update_rate": 0.0},
    }


def balance_run(
    args: argparse.Namespace, data: TokenData, vocab: int, moe: dict
) -> tuple[float, float, float, float]:
    """CVs of the expert load: per step over the first and last ``tail`` steps, and of the load
    summed over the last ``tail`` steps (the imbalance that batch-to-batch noise does not
    explain); then the final training loss. All averaged over layers."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        model_config(args, "moe", args.train_d_model, **moe), vocab_size=vocab
    )
    model = LanguageModel(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    cvs, loads, loss = [], [], float("nan")
    for step in range(args.steps):
        x, y = random_batch(data.train, step, args.train_batch, args.train_seq_len, seed=0)
        logits, _ = model(x)
        loss_tensor = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        aux = model.auxiliary_loss()
        (loss_tensor if aux is None else loss_tensor + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        layers = list(model.pop_statistics().values())
        cvs.append(statistics.mean(stats["load_cv"] for stats in layers))
        loads.append(torch.tensor([stats["load"] for stats in layers]))
        loss = loss_tensor.item()
    summed = torch.stack(loads[-args.tail :]).sum(0)
    summed_cv = (summed.std(-1, correction=0) / summed.mean(-1)).mean().item()
    return statistics.mean(cvs[: args.tail]), statistics.mean(cvs[-args.tail :]), summed_cv, loss


def section_balance(args: argparse.Namespace) -> None:
    data, tokenizer = prepare_data(DataConfig(tokenizer="char", seq_len=args.train_seq_len))
    rows = []
    for name, moe in balancing_recipes(args).items():
        result = balance_run(args, data, tokenizer.vocab_size, moe)
        rows.append([name, *[f"{value:.3f}" for value in result]])
        print(f"  trained {name}", file=sys.stderr, flush=True)
    print(
        f"\n### (b) Expert-load balance after {args.steps} steps ({args.router}, "
        f"{args.experts} experts, top-{args.top_k}; {args.n_layers} layers, d_model "
        f"{args.train_d_model}, batch {args.train_batch} x {args.train_seq_len}, Shakespeare "
        f"chars, AdamW lr {args.lr}); coefficient of variation of the expert load, averaged "
        "over layers\n"
    )
    header = [
        "balancing",
        f"CV per step, first {args.tail}",
        f"CV per step, last {args.tail}",
        f"CV of the last {args.tail} steps' summed load",
    ]
    print_table([*header, "final train loss"], rows)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.sections.split(","):
        SECTIONS[name](args)


SECTIONS = {"cost": section_cost, "balance": section_balance}

if __name__ == "__main__":
    main()

"""The ``lmlab`` command: a thin layer over the library.

Every user mistake surfaces as ``error: <one line>`` and exit code 2 (see ``LmlabError``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from lmlab.errors import LmlabError

DEFAULT_PRESET = "gpt-tiny"
OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")


def add_configs_and_overrides(parser: argparse.ArgumentParser, configs: str) -> None:
    """Give a command the positional ``items``: configs and ``key=value`` overrides, which
    ``parse_args`` lets appear before, between or after the command's options and splits into
    ``args.configs`` and ``args.overrides``."""
    parser.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG|KEY=VALUE",
        help=f"{configs}, and key=value overrides (e.g. model.d_model=64); before, between or "
        "after the options",
    )


def is_override(item: str) -> bool:
    """``key=value`` with a dotted key, unless it names an existing file (YAML names may hold
    '=')."""
    return OVERRIDE.match(item) is not None and not Path(item).exists()


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line. argparse fills a command's positionals from one run of
    arguments and rejects those written after an option; they are gathered into ``items``
    here instead, so ``lmlab probe gpt-tiny --task mqar model.d_model=64`` works."""
    args, extras = parser.parse_known_args(argv)
    takes_items = hasattr(args, "items")
    if extras and (not takes_items or any(extra.startswith("-") for extra in extras)):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if takes_items:
        items = args.items + extras
        args.configs = [item for item in items if not is_override(item)]
        args.overrides = [item for item in items if is_override(item)]
    return args


def one_config(configs: list[str], default: str | None = DEFAULT_PRESET) -> str:
    """The single config of a command (``default`` when none is given)."""
    if len(configs) > 1:
        raise LmlabError(
            f"unexpected argument {configs[1]!r}; give one config (a preset or YAML path) "
            "and key=value overrides"
        )
    if configs:
        return configs[0]
    if default is None:
        raise LmlabError("give a config: a preset or a YAML file")
    return default


def run_resumable(run: Callable[..., dict], plan: object, args: argparse.Namespace) -> dict | None:
    """Run a compare, scale or search plan; on Ctrl-C say how to continue and return None."""
    try:
        return run(plan, show_progress=not args.quiet, registry_location=args.registry)
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to continue", file=sys.stderr)
        return None


def cmd_train(args: argparse.Namespace) -> int:
    from lmlab.config.load import build_config
    from lmlab.train.launch import new_trainer, resume_trainer

    sources = [source for source in (args.preset, args.config) if source] + args.configs
    if args.resume:
        if sources:
            raise LmlabError("--resume takes its config from the run; drop the config")
        trainer = resume_trainer(args.resume, args.overrides, show_progress=not args.quiet)
    else:
        source = one_config(sources)
        config = build_config(source, args.overrides)
        trainer = new_trainer(config, Path(source).stem, show_progress=not args.quiet)
    run_dir, config, tokenizer = trainer.run_dir, trainer.config, trainer.tokenizer
    model = trainer.model
    mixers = config.model.layer_mixers()
    print(
        f"run {run_dir}: {model.num_parameters() / 1e6:.2f}M parameters, "
        f"{tokenizer.kind} tokenizer ({tokenizer.vocab_size}), {trainer.device}, "
        f"{trainer.precision}, layers {mixers[0] if len(set(mixers)) == 1 else ','.join(mixers)}",
        file=sys.stderr,
    )
    try:
        summary = trainer.train()
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: lmlab train --resume {run_dir}", file=sys.stderr)
        return 130
    print(
        f"done: {summary['steps']} steps, {summary['tokens']} tokens in "
        f"{summary['train_seconds']:.1f}s ({summary['tokens_per_s'] / 1000:.1f}k tok/s); "
        f"val loss {summary['val_loss']:.4f}, {summary['val_bits_per_byte']:.4f} bits/byte"
    )
    print(f"run folder: {run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from lmlab.data.dataset import prepare_data
    from lmlab.eval.evaluate import evaluate
    from lmlab.train.device import autocast, pick_device, resolve_precision
    from lmlab.train.run import load_trained_model

    device = pick_device(args.device)
    config, model, tokenizer, step = load_trained_model(args.run, device)
    data, _ = prepare_data(config.data, tokenizer)
    precision = resolve_precision(config.train.precision, device)
    result = evaluate(
        model,
        data,
        batch_size=config.train.batch_size,
        seq_len=args.seq_len or config.data.seq_len,
        max_batches=args.batches,
        device=device,
        autocast=autocast(device, precision),
        split=args.split,
    )
    result["step"] = step
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.run} @ step {step} ({args.split}, {result['tokens']} tokens): "
            f"loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.2f}, "
            f"{result['bits_per_byte']:.4f} bits/byte"
        )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from lmlab.data.tokenizers import warn_unknown
    from lmlab.model.generate import SamplingSettings, stream_tokens
    from lmlab.train.device import pick_device
    from lmlab.train.run import load_trained_model

    settings = SamplingSettings(args.temperature, args.top_k, args.top_p, args.min_p)
    settings.validate()
    if args.max_new_tokens < 0:
        raise LmlabError("--max-new-tokens must be >= 0")
    device = pick_device(args.device)
    _, model, tokenizer, _ = load_trained_model(args.run, device)
    ids = tokenizer.encode_array(args.prompt)
    warn_unknown(tokenizer, [ids], "the prompt")
    if not len(ids):
        raise LmlabError("--prompt is empty after tokenisation; give at least one character")
    prompt = torch.tensor([ids.tolist()], device=device)
    sys.stdout.write(args.prompt)
    new_ids: list[int] = []
    printed = ""
    for token in stream_tokens(model, prompt, args.max_new_tokens, settings, args.seed):
        new_ids.append(int(token))
        text = tokenizer.decode(new_ids)
        sys.stdout.write(text[len(printed) :])
        sys.stdout.flush()
        printed = text
    sys.stdout.write("\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lmlab.train.export import export_run

    result = export_run(args.run, args.out, args.format)
    print(
        f"{result['out']}: step {result['step']}, {result['ternary_layers']} ternary layers, "
        f"{result['bytes'] / 1024:.1f} KiB (fp32 checkpoint model: "
        f"{result['checkpoint_bytes'] / 1024:.1f} KiB, "
        f"{result['checkpoint_bytes'] / result['bytes']:.1f}x larger)"
    )
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from lmlab.config.load import preset_description, preset_names

    names = preset_names()
    width = max(len(name) for name in names)
    for name in names:
        print(f"{name:<{width}}  {preset_description(name)}".rstrip())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from lmlab.config.load import build_config
    from lmlab.model.lm import LanguageModel

    config = build_config(
        one_config(([args.preset] if args.preset else []) + args.configs), args.overrides
    )
    if config.model.vocab_size == 0:
        config.model.vocab_size = 256 if config.data.tokenizer != "bpe" else config.data.vocab_size
    model = LanguageModel(config.model)
    context = config.data.seq_len
    print(f"layers: {', '.join(config.model.layer_mixers())}")
    print(f"parameters: {model.num_parameters():,} ({model.num_parameters(True):,} non-embedding)")
    print(f"forward FLOPs/token at context {context}: {model.flops_per_token(context):,.0f}")
    print(f"training FLOPs/token (3x forward): {3 * model.flops_per_token(context):,.0f}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lmlab.experiments.compare import plan_compare, run_compare, summary_lines

    if not args.budget:
        raise LmlabError("give --budget, e.g. --budget tokens=2M (or flops=1e15, time=10m)")
    plan = plan_compare(
        args.configs,
        budget=args.budget,
        variants=args.variant,
        overrides=args.overrides,
        seeds=args.seeds,
        baseline=args.baseline,
        rule=args.rule,
        out=args.out,
        target=args.target_loss,
        parallel=args.parallel,
    )
    print(f"compare folder {plan.out} ({len(plan.runset.runs)} runs)", file=sys.stderr)
    results = run_resumable(run_compare, plan, args)
    if results is None:
        return 130
    print("\n".join(summary_lines(results)))
    return 1 if results["failed"] else 0


def cmd_scale(args: argparse.Namespace) -> int:
    from lmlab.experiments.scale import plan_scale, run_scale, summary_lines

    source = one_config(([args.preset] if args.preset else []) + args.configs)
    plan = plan_scale(
        source,
        args.overrides,
        sizes=args.sizes,
        tokens=args.tokens,
        holdout=args.holdout,
        seeds=args.seeds,
        out=args.out,
    )
    print(f"scale folder {plan.out} ({len(plan.runs.runs)} runs)", file=sys.stderr)
    results = run_resumable(run_scale, plan, args)
    if results is None:
        return 130
    print("\n".join(summary_lines(results)))
    return 1 if results["failed"] else 0


def _scale_options(scale: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``lmlab scale``."""
    scale.add_argument("--preset", help="a preset shipped with lmlab (or give a YAML path)")
    scale.add_argument(
        "--sizes",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="model sizes, e.g. d_model=32,48,64 (model.* keys; repeat the flag to grow "
        "several keys together, e.g. --sizes n_layers=2,3,4)",
    )
    scale.add_argument("--tokens", help="training-token budgets, e.g. 200k,400k")
    scale.add_argument(
        "--holdout",
        metavar="'KEY=V tokens=N'",
        help="a larger run to predict before it trains, e.g. 'd_model=96 tokens=800k'",
    )
    scale.add_argument("--seeds", type=int, default=1, help="seeds per grid point (1)")
    scale.add_argument("--out", help="study folder (default: OUT_DIR/scale-<config>)")
    scale.add_argument(
        "--registry", help="run registry database ($LMLAB_REGISTRY or runs/registry.sqlite)"
    )
    scale.add_argument("--quiet", action="store_true", help="no progress bars (one line per run)")
    return scale


def cmd_search(args: argparse.Namespace) -> int:
    from lmlab.experiments.search import plan_search, run_search, summary_lines

    plan = plan_search(
        args.space, trials=args.trials, budget=args.budget, out=args.out, seed=args.seed
    )
    print(f"search folder {plan.out} ({plan.trials} trials)", file=sys.stderr)
    results = run_resumable(run_search, plan, args)
    if results is None:
        return 130
    print("\n".join(summary_lines(results)))
    return 0 if results["best"] else 1


def cmd_runs(args: argparse.Namespace) -> int:
    import json

    from lmlab.train.registry import format_runs, list_runs

    rows, compare = list_runs(args.folder, args.filter, args.compare)
    if args.json:
        print(json.dumps({"runs": rows, "compare": compare}, indent=2))
    else:
        print(format_runs(rows, compare))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from lmlab.config.load import build_config
    from lmlab.eval.probes import TASKS, ProbeTask
    from lmlab.experiments.probe import parse_list, run_loss_by_position, run_probe, sweep_table

    source = one_config(args.configs, default=None)
    if args.task == "loss_by_position":
        report = run_loss_by_position(source, buckets=args.buckets)
        print(f"{source} @ step {report['step']}: mean loss per position bucket")
        for length, curve in report["loss"].items():
            print(f"  length {length}: " + " ".join(f"{v:.3f}" for v in curve))
        return 0
    if args.task not in TASKS:
        raise LmlabError(
            f"unknown probe task {args.task!r}; use {', '.join(TASKS)} or loss_by_position"
        )
    lrs = parse_list(args.lrs, float, "--lrs")
    config = build_config(source, args.overrides)
    lengths = parse_list(args.lengths, int, "--lengths") if args.lengths else []
    task = ProbeTask(
        args.task,
        args.seq_len,
        vocab_size=args.vocab,
        items=args.kv_pairs,
        num_examples=args.examples,
        seed=args.seed,
        eval_lengths=tuple(lengths),
    )
    out = Path(args.out) if args.out else None
    report = run_probe(
        config,
        task,
        epochs=args.epochs,
        lrs=lrs,
        batch_size=args.batch_size,
        warmup=args.warmup,
        evals_per_epoch=args.evals_per_epoch,
        out=out,
        log=lambda s: print(s, file=sys.stderr),
    )
    print(sweep_table(report))
    if out is not None:
        print(f"scores written to {out / 'probes.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmlab",
        description="Build, train, evaluate and compare small language models.",
        epilog="Examples:\n"
        "  lmlab train --preset gpt-tiny train.max_steps=500\n"
        "  lmlab train my.yaml model.d_model=256 train.lr=3e-3\n"
        "  lmlab train --resume runs/gpt-tiny-20260101-120000\n"
        "  lmlab eval runs/gpt-tiny-20260101-120000\n"
        '  lmlab generate runs/gpt-tiny-20260101-120000 --prompt "ROMEO:"\n'
        "  lmlab export runs/bitnet-run --format ternary --out model.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a model (new run or --resume)",
        description="Train a model. Settings come from a preset or YAML file, then key=value "
        "overrides (e.g. model.d_model=256 train.lr=3e-3 data.tokenizer=bpe). "
        f"Without a config the '{DEFAULT_PRESET}' preset is used. The run folder (config, "
        "tokenizer, metrics.jsonl, checkpoints, summary.json) is printed at the start.",
    )
    train.add_argument("--preset", help="a preset shipped with lmlab (see: lmlab presets)")
    train.add_argument("--config", help="a YAML config file")
    train.add_argument("--resume", metavar="RUN", help="continue a run folder exactly")
    train.add_argument("--quiet", action="store_true", help="no progress line")
    add_configs_and_overrides(train, "a preset or YAML file (or use --preset/--config)")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "eval",
        help="validation loss, perplexity and bits per byte of a run",
        description="Evaluate a run's newest valid checkpoint on its validation split.",
    )
    evaluate.add_argument("run", help="run folder")
    evaluate.add_argument("--batches", type=int, default=50, help="evaluation batches (50)")
    evaluate.add_argument("--split", choices=["val", "train"], default="val")
    evaluate.add_argument(
        "--seq-len", type=int, default=0, help="context of the evaluation windows (the run's)"
    )
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    evaluate.set_defaults(func=cmd_eval)

    generate = commands.add_parser(
        "generate",
        help="sample text from a run",
        description="Sample from a run with its state/KV cache (one prefill, then one token "
        "per step).",
    )
    generate.add_argument("run", help="run folder")
    generate.add_argument("--prompt", default="\n", help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    generate.add_argument("--top-k", type=int, default=0, help="keep the k likeliest (0: off)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1: off)")
    generate.add_argument("--min-p", type=float, default=0.0, help="min-p filter (0: off)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--device", default="auto")
    generate.set_defaults(func=cmd_generate)

    export = commands.add_parser(
        "export",
        help="write a trained BitLinear run as packed ternary weights (safetensors)",
        description="Write a run's newest valid checkpoint as one safetensors file: every\n"
        "BitLinear weight packed (2 bits per weight) with its scale, every other tensor as is,\n"
        "the config and tokenizer in the metadata. Needs a run trained with\n"
        "model.bitlinear=true. See docs/bitlinear.md.",
        epilog="Example:\n"
        "  lmlab export runs/gpt-tiny-20260101-120000 --format ternary --out tiny.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("run", help="run folder")
    export.add_argument("--format", default="ternary", help="export format: ternary (ternary)")
    export.add_argument("--out", required=True, help="file to write (replaced atomically)")
    export.set_defaults(func=cmd_export)

    presets = commands.add_parser(
        "presets", help="list the shipped presets (docs/presets/<name>.md has their figures)"
    )
    presets.set_defaults(func=cmd_presets)

    info = commands.add_parser("info", help="parameters and FLOPs of a config without training it")
    info.add_argument("--preset", help="a preset shipped with lmlab (see: lmlab presets)")
    add_configs_and_overrides(info, f"a preset or YAML file ({DEFAULT_PRESET})")
    info.set_defaults(func=cmd_info)

    compare = commands.add_parser(
        "compare",
        help="compare configs at a matched budget over several seeds, with a verdict",
        description="Train every arm with the same budget and seeds (seed i: same initial\n"
        "seed and batch order in every arm), then report mean ± sd, paired differences with\n"
        "t and bootstrap intervals, and a verdict per candidate against the baseline\n"
        "(PROMOTE, REGRESSION or NO EVIDENCE) in COMPARE/report.md and results.json.\n"
        "Run the same command again to continue an interrupted comparison: finished runs\n"
        "are reused, unfinished ones resumed. See docs/compare.md.",
        epilog="Examples:\n"
        "  lmlab compare base.yaml cand.yaml --seeds 3 --budget tokens=2M\n"
        "  lmlab compare gpt-tiny --variant model.mixer=gla --budget time=5m model.d_model=64\n"
        "  lmlab compare a.yaml b.yaml c.yaml --budget flops=1e15 --baseline b --rule rule.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument(
        "--budget",
        help="per run: tokens=N (2M), flops=N (training FLOPs, 1e15) or time=N (10m, 90s)",
    )
    compare.add_argument("--seeds", type=int, default=3, help="seeds per arm (3)")
    compare.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="add an arm: the first config plus this override (repeatable)",
    )
    compare.add_argument("--baseline", help="arm the others are judged against (the first)")
    compare.add_argument(
        "--rule",
        help="YAML promotion rule: metric, min_effect, confidence, interval, probe_tolerance "
        "(default val_bits_per_byte, 0.01, 0.95, t, 0.02)",
    )
    compare.add_argument("--out", help="compare folder (default: OUT_DIR/compare-<arm>-vs-<arm>)")
    compare.add_argument(
        "--parallel",
        type=int,
        default=0,
        metavar="K",
        help="train K runs at once, each an 'lmlab train' process sharing the cores "
        "(0: one after another in this process)",
    )
    compare.add_argument(
        "--target-loss",
        type=float,
        metavar="BPB",
        help="validation bits per byte for 'time to target' (the baseline's median final)",
    )
    compare.add_argument(
        "--registry", help="run registry database ($LMLAB_REGISTRY or runs/registry.sqlite)"
    )
    compare.add_argument("--quiet", action="store_true", help="no progress bars (one line per run)")
    add_configs_and_overrides(compare, "arms (presets or YAML files); overrides apply to every arm")
    compare.set_defaults(func=cmd_compare)

    scale = commands.add_parser(
        "scale",
        help="train a size x tokens grid, fit a scaling law, predict a held-out larger run",
        description="Train every model size at every token budget (seeds: --seeds), fit\n"
        "L(N, D) = E + A/N^alpha + B/D^beta to the final validation bits per byte (N:\n"
        "non-embedding parameters, D: training tokens), predict the --holdout run before it\n"
        "trains, then train it and report the relative error. Writes SCALE/report.md (runs,\n"
        "fit, plot) and results.json; rerun the same command to continue (finished runs are\n"
        "reused). See docs/scale.md.",
        epilog="Examples:\n"
        "  lmlab scale gpt-tiny --sizes d_model=32,48,64 --tokens 200k,400k,800k \\\n"
        "      --holdout 'd_model=96 tokens=800k' model.n_layers=2\n"
        "  lmlab scale my.yaml --sizes d_model=64,128,256 --sizes n_layers=2,4,8 --tokens 1M,4M",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _scale_options(scale)
    add_configs_and_overrides(
        scale, f"a preset or YAML file ({DEFAULT_PRESET}); overrides apply to every run"
    )
    scale.set_defaults(func=cmd_scale)

    search = commands.add_parser(
        "search",
        help="search a config space with Optuna (TPE, successive-halving pruning)",
        description="Sample configs from SPACE.yaml with a seeded TPE sampler, train each at\n"
        "--budget, report validation bits per byte at every evaluation and stop trials that\n"
        "successive halving prunes. Writes SEARCH/best.yaml (a config for lmlab train),\n"
        "report.md and results.json; the Optuna study lives in SEARCH/study.sqlite3, so the\n"
        "same command continues an interrupted search. See docs/search.md.",
        epilog="Example SPACE.yaml:\n"
        "  base: gpt-tiny\n"
        "  overrides: [model.n_layers=2]\n"
        "  params:\n"
        "    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
        "    model.d_model: {low: 32, high: 96, step: 16}\n"
        "    model.mixer: [attention, gla]\n\n"
        "  lmlab search space.yaml --trials 20 --budget tokens=400k",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    search.add_argument("space", help="YAML file: base config, fixed overrides, parameter ranges")
    search.add_argument("--trials", type=int, default=20, help="trials in total (20)")
    search.add_argument(
        "--budget", required=True, help="per trial: tokens=N, flops=N or time=N (as compare)"
    )
    search.add_argument("--seed", type=int, default=0, help="sampler seed (0)")
    search.add_argument("--out", help="search folder (default: OUT_DIR/search-<space>)")
    search.add_argument(
        "--registry", help="run registry database ($LMLAB_REGISTRY or runs/registry.sqlite)"
    )
    search.add_argument("--quiet", action="store_true", help="no progress bars")
    search.set_defaults(func=cmd_search)

    runs = commands.add_parser(
        "runs",
        help="list runs and comparisons recorded in the run registry",
        description="List the runs in the SQLite run registry, newest first.",
    )
    runs.add_argument(
        "folder",
        nargs="?",
        help="runs folder holding registry.sqlite, or the database file "
        "(default: $LMLAB_REGISTRY or runs/registry.sqlite)",
    )
    runs.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep rows whose column equals VALUE (* and ? match anything), e.g. arm=base, "
        "status=failed; repeatable",
    )
    runs.add_argument("--compare", metavar="NAME", help="only the runs of this comparison")
    runs.add_argument("--json", action="store_true", help="print JSON")
    runs.set_defaults(func=cmd_runs)

    probe = commands.add_parser(
        "probe",
        help="synthetic capability probes (MQAR, induction, copying, needle) or loss by position",
        description="Train the config's architecture from scratch on a synthetic task at each\n"
        "learning rate and report held-out accuracy (best of the sweep; solved at >= 0.99).\n"
        "With --task loss_by_position, CONFIG is a run folder: mean validation loss per\n"
        "position bucket at 1x, 2x and 4x its training length. See docs/probes.md.",
        epilog="Examples:\n"
        "  lmlab probe gpt-tiny model.d_model=64 --task mqar --seq-len 256 --kv-pairs 16\n"
        "  lmlab probe my.yaml --task needle --seq-len 256 --lengths 64,128,256 --out runs/x\n"
        "  lmlab probe runs/gpt-tiny-20260101-120000 --task loss_by_position",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_configs_and_overrides(probe, "a preset or YAML file (a run folder for loss_by_position)")
    probe.add_argument(
        "--task",
        default="mqar",
        help="mqar, induction, selective_copy, needle or loss_by_position (mqar)",
    )
    probe.add_argument("--seq-len", type=int, default=256, help="sequence length (256)")
    probe.add_argument(
        "--kv-pairs", type=int, default=16, help="kv pairs (mqar) or tokens to copy (16)"
    )
    probe.add_argument("--vocab", type=int, default=8192, help="vocabulary size (8192)")
    probe.add_argument("--examples", type=int, default=20000, help="training examples (20000)")
    probe.add_argument("--epochs", type=int, default=16, help="passes over the examples (16)")
    probe.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="learning-rate sweep")
    probe.add_argument("--batch-size", type=int, default=64, help="examples per step (64)")
    probe.add_argument(
        "--warmup", type=float, default=0.1, help="fraction of the steps of linear warmup (0.1)"
    )
    probe.add_argument(
        "--evals-per-epoch",
        type=int,
        default=16,
        help="test-set checks per epoch (screened on 128 examples, confirmed on all); "
        "training stops at the first that solves (16)",
    )
    probe.add_argument("--lengths", help="needle: test lengths, e.g. 64,128,256 (--seq-len)")
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--buckets", type=int, default=8, help="loss_by_position buckets (8)")
    probe.add_argument("--out", help="folder for probes.json and the per-lr table (e.g. a run)")
    probe.set_defaults(func=cmd_probe)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        return args.func(args)
    except LmlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

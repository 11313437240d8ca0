"""The ``lmlab`` command: a thin layer over the library.

Each command is a row of :data:`COMMANDS`: a handler that calls library functions, and options
declared once (:class:`Opt`) and shared between commands. An option that feeds a library
parameter takes its default from that function's signature, so the two cannot drift; a
:class:`ParamError` the library raises names the parameter, and :func:`main` words it with the
option's flag instead. Every user mistake surfaces as ``error: <one line>`` and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from lmlab.errors import LmlabError, ParamError
from lmlab.eval.evaluate import evaluate
from lmlab.eval.probes import ProbeTask
from lmlab.experiments.compare import plan_compare
from lmlab.experiments.probe import run_loss_by_position, run_probe
from lmlab.experiments.scale import plan_scale
from lmlab.experiments.search import plan_search
from lmlab.model.generate import SamplingSettings, stream_tokens
from lmlab.posttrain.merge import merge_run
from lmlab.train.export import export_run
from lmlab.train.registry import list_runs

if TYPE_CHECKING:
    from lmlab.train.trainer import Trainer

DEFAULT_PRESET = "gpt-tiny"
OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")
REGISTRY_HELP = "run registry database ($LMLAB_REGISTRY or runs/registry.sqlite)"


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``error: ...``, exit 2) like every other error."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return value


@dataclasses.dataclass(frozen=True)
class Opt:
    """One option, declared once. ``param`` is the library parameter it feeds, which must exist
    in ``source``, else the command's library function (building the parser checks it); its
    default comes from there unless ``default`` is set;
    ``aliases`` are further parameter names the library may name in errors about it."""

    flag: str
    help: str
    param: str | None = None
    source: Callable[..., Any] | None = None
    aliases: tuple[str, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def add(self, parser: argparse.ArgumentParser, library: Callable[..., Any] | None) -> None:
        kwargs = dict(self.kwargs)
        source = self.source or library
        if self.param and source is not None:
            default = inspect.signature(source).parameters[self.param].default
            if "default" not in kwargs and default is not inspect.Parameter.empty:
                kwargs["default"] = list(default) if isinstance(default, tuple) else default
        default = kwargs.get("default")
        shown = (
            default is not None and default is not False and str(default).strip() not in ("", "[]")
        )
        if self.flag.startswith("-") and "metavar" not in kwargs and "action" not in kwargs:
            kwargs["metavar"] = self.flag.lstrip("-").upper().replace("-", "_")
        help_text = f"{self.help} ({default})" if shown else self.help
        if self.flag.startswith("-"):
            parser.add_argument(self.flag, dest=self.param, help=help_text, **kwargs)
        else:
            parser.add_argument(self.flag, help=help_text, **kwargs)


def opt(flag: str, help: str, param: str | None = None, **kwargs: Any) -> Opt:
    """An :class:`Opt`; ``source`` and ``aliases`` go with ``param``, the rest to argparse."""
    source = kwargs.pop("source", None)
    aliases = kwargs.pop("aliases", ())
    return Opt(flag, help, param, source, aliases, kwargs)


ITEMS = "config_items"
PRESET = opt("--preset", "a preset shipped with lmlab (see: lmlab presets)")
QUIET = opt("--quiet", "no progress bars (one line per run)", action="store_true")
REGISTRY = opt("--registry", REGISTRY_HELP)
SEEDS = opt("--seeds", "seeds per arm or grid point", "seeds", type=int)
OUT = opt("--out", "study folder (default: <command>-<names> in the config's out_dir)", "out")
BUDGET = opt(
    "--budget",
    "per run: tokens=N (2M), flops=N (training FLOPs, 1e15) or time=N (10m, 90s)",
    "budget",
)
RUN = opt("run", "run folder")
DEVICE = opt("--device", "cpu, cuda, mps or auto", default="auto")
JSON = opt("--json", "print JSON", action="store_true")
SAMPLER_SEED = opt("--seed", "random seed", "seed", type=at_least(0))


@dataclasses.dataclass(frozen=True)
class Command:
    """One verb: its handler, the library function its options mirror, its options, and the
    positional configs and ``key=value`` overrides when ``items`` says what they are."""

    name: str
    run: Callable[[argparse.Namespace], int]
    help: str
    options: tuple[Opt, ...] = ()
    library: Callable[..., Any] | None = None
    items: str | None = None
    description: str | None = None
    epilog: str | None = None

    def flags(self) -> dict[str, str]:
        """Library parameter -> the flag that sets it, for wording library errors."""
        names = {}
        for option in self.options:
            for param in filter(None, (option.param, *option.aliases)):
                names[param] = option.flag
        return names


def is_override(item: str) -> bool:
    """``key=value`` with a dotted key, unless it names an existing file (YAML names may hold
    '=')."""
    return OVERRIDE.match(item) is not None and not Path(item).exists()


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line. argparse fills a command's positionals from one run of
    arguments and rejects those written after an option; they are gathered into ``items``
    here instead, so ``lmlab probe gpt-tiny --task mqar model.d_model=64`` works."""
    args, extras = parser.parse_known_args(argv)
    takes_items = hasattr(args, ITEMS)
    if extras and (not takes_items or any(extra.startswith("-") for extra in extras)):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if takes_items:
        items = getattr(args, ITEMS) + extras
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


def preset_and_configs(args: argparse.Namespace) -> list[str]:
    return ([args.preset] if args.preset else []) + args.configs


def run_resumable(run: Callable[..., dict], plan: object, args: argparse.Namespace) -> dict | None:
    """Run a compare, scale or search plan; on Ctrl-C say how to continue and return None."""
    try:
        return run(plan, show_progress=not args.quiet, registry_location=args.registry)
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to continue", file=sys.stderr)
        return None


def finish(lines: list[str], ok: bool) -> int:
    print("\n".join(lines))
    return 0 if ok else 1


def is_init_from(overrides: list[str]) -> bool:
    """Whether the overrides start the run from another (then that run's config is the base)."""
    return any(
        key.strip() == "train.init_from" and value.strip()
        for key, _, value in (item.partition("=") for item in overrides)
    )


def cmd_train(args: argparse.Namespace) -> int:
    from lmlab.posttrain.launch import start_run
    from lmlab.train.launch import parent_config, resume_trainer

    sources = [source for source in (args.preset, args.config) if source] + args.configs
    if args.resume:
        if sources:
            raise LmlabError("--resume takes its config from the run; drop the config")
        trainer = resume_trainer(args.resume, args.overrides, show_progress=not args.quiet)
    else:
        source = one_config(sources) if sources or not is_init_from(args.overrides) else None
        config = parent_config(source, args.overrides)
        label = Path(source).stem if source else "init"
        trainer = start_run(config, label, show_progress=not args.quiet)
    return train_to_end(trainer)


def cmd_finetune(args: argparse.Namespace) -> int:
    from lmlab.posttrain.launch import start_run
    from lmlab.train.launch import parent_config

    settings = [
        f"train.init_from={args.run}",
        f"post.method={args.method}",
        f"post.data={args.data}",
        *(["post.lora=true"] if args.lora else []),
        *([f"post.teacher={args.teacher}"] if args.teacher else []),
        *args.overrides,
    ]
    if args.configs:
        raise LmlabError(
            f"unexpected argument {args.configs[0]!r}; finetune takes the run's settings, "
            "changed with key=value overrides"
        )
    trainer = start_run(parent_config(None, settings), args.method, show_progress=not args.quiet)
    return train_to_end(trainer)


def train_to_end(trainer: Trainer) -> int:
    """Train a started run, printing its header, its result and how to continue it."""
    from lmlab.train.adapters import trainable_parameters

    run_dir, config, tokenizer = trainer.run_dir, trainer.config, trainer.tokenizer
    model = trainer.model
    mixers = config.model.layer_mixers()
    print(
        f"run {run_dir}: {model.num_parameters() / 1e6:.2f}M parameters, "
        f"{tokenizer.kind} tokenizer ({tokenizer.vocab_size}), {trainer.device}, "
        f"{trainer.precision}, layers {mixers[0] if len(set(mixers)) == 1 else ','.join(mixers)}",
        file=sys.stderr,
    )
    if trainer.adapter is not None:
        trained, total = trainable_parameters(model)
        print(
            f"LoRA: {trained:,} of {total:,} parameters train ({trained / total:.2%}), "
            f"rank {config.post.lora_rank}, base {config.post.quantize_base}",
            file=sys.stderr,
        )
    try:
        summary = trainer.train()
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: lmlab train --resume {run_dir}", file=sys.stderr)
        return 130
    accuracy = summary.get("val_accuracy")
    print(
        f"done: {summary['steps']} steps, {summary['tokens']} tokens in "
        f"{summary['train_seconds']:.1f}s ({summary['tokens_per_s'] / 1000:.1f}k tok/s); "
        f"val loss {summary['val_loss']:.4f}, {summary['val_bits_per_byte']:.4f} bits/byte"
        + ("" if accuracy is None else f", accuracy {accuracy:.1%}")
    )
    print(f"run folder: {run_dir}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lmlab.posttrain.merge import merge_run

    run_dir = merge_run(args.run, args.name)
    print(f"merged run: {run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from lmlab.data.dataset import prepare_data
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
        max_batches=args.max_batches,
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
    from lmlab.train.device import pick_device
    from lmlab.train.run import load_trained_model

    settings = SamplingSettings(args.temperature, args.top_k, args.top_p, args.min_p)
    settings.validate()
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
    result = export_run(args.run, args.out, args.fmt)
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


def mixer_lines() -> list[str]:
    """Every registered token and channel mixer with the first paragraph of its docstring."""
    from lmlab.layers.registry import CHANNEL_MIXERS, TOKEN_MIXERS, import_builtin_layers

    import_builtin_layers()
    lines = []
    for kind, table in (("token mixers", TOKEN_MIXERS), ("channel mixers", CHANNEL_MIXERS)):
        lines.append(f"{kind} (model.mixer / model.channel_mixer):")
        width = max(len(name) for name in table)
        for name, cls in sorted(table.items()):
            summary = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
            lines.append(f"  {name:<{width}}  {summary}".rstrip())
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    from lmlab.config.load import build_config
    from lmlab.data.dataset import resolve_vocab
    from lmlab.model.lm import LanguageModel

    if args.mixers:
        print("\n".join(mixer_lines()))
        return 0
    config = build_config(one_config(preset_and_configs(args)), args.overrides)
    tokenizer = resolve_vocab(config)
    model = LanguageModel(config.model)
    context = config.data.seq_len
    print(f"layers: {', '.join(config.model.layer_mixers())}")
    print(
        f"vocabulary: {config.model.vocab_size} ({tokenizer.kind} tokenizer, "
        f"{tokenizer.vocab_size} tokens, trained on the config's data as a run would)"
    )
    print(f"parameters: {model.num_parameters():,} ({model.num_parameters(True):,} non-embedding)")
    print(f"forward FLOPs/token at context {context}: {model.flops_per_token(context):,.0f}")
    print(f"training FLOPs/token (3x forward): {3 * model.flops_per_token(context):,.0f}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lmlab.experiments.compare import run_compare, summary_lines

    if not args.budget:
        raise LmlabError("give --budget, e.g. --budget tokens=2M (or flops=1e15, time=10m)")
    plan = plan_compare(
        args.configs,
        budget=args.budget,
        variants=args.variants,
        overrides=args.overrides,
        seeds=args.seeds,
        baseline=args.baseline,
        rule=args.rule,
        out=args.out,
        target=args.target,
        parallel=args.parallel,
    )
    print(f"compare folder {plan.out} ({len(plan.runset.runs)} runs)", file=sys.stderr)
    results = run_resumable(run_compare, plan, args)
    return 130 if results is None else finish(summary_lines(results), not results["failed"])


def cmd_scale(args: argparse.Namespace) -> int:
    from lmlab.experiments.scale import run_scale, summary_lines

    plan = plan_scale(
        one_config(preset_and_configs(args)),
        args.overrides,
        sizes=args.sizes,
        tokens=args.tokens,
        holdout=args.holdout,
        seeds=args.seeds,
        out=args.out,
    )
    print(f"scale folder {plan.out} ({len(plan.runs.runs)} runs)", file=sys.stderr)
    results = run_resumable(run_scale, plan, args)
    return 130 if results is None else finish(summary_lines(results), not results["failed"])


def cmd_search(args: argparse.Namespace) -> int:
    from lmlab.experiments.search import run_search, summary_lines

    plan = plan_search(
        args.space, trials=args.trials, budget=args.budget, out=args.out, seed=args.seed
    )
    print(f"search folder {plan.out} ({plan.trials} trials)", file=sys.stderr)
    results = run_resumable(run_search, plan, args)
    return 130 if results is None else finish(summary_lines(results), bool(results["best"]))


def cmd_runs(args: argparse.Namespace) -> int:
    import json

    from lmlab.train.registry import format_runs

    rows, compare = list_runs(args.location, args.filters, args.compare)
    if args.json:
        print(json.dumps({"runs": rows, "compare": compare}, indent=2))
    else:
        print(format_runs(rows, compare))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from lmlab.config.load import build_config
    from lmlab.eval.probes import TASKS
    from lmlab.experiments.probe import parse_list, sweep_table

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
        vocab_size=args.vocab_size,
        items=args.items,
        num_examples=args.num_examples,
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


COMMANDS: tuple[Command, ...] = (
    Command(
        "train",
        cmd_train,
        "train a model (new run or --resume)",
        (
            PRESET,
            opt("--config", "a YAML config file"),
            opt("--resume", "continue a run folder exactly", metavar="RUN"),
            opt("--quiet", "no progress line", action="store_true"),
        ),
        items="a preset or YAML file (or use --preset/--config)",
        description="Train a model. Settings come from a preset or YAML file, then key=value "
        "overrides (e.g. model.d_model=256 train.lr=3e-3 data.tokenizer=bpe). "
        f"Without a config the '{DEFAULT_PRESET}' preset is used, or with "
        "train.init_from=RUN[@STEP] (start from that run's weights) that run's settings. The run "
        "folder (config, tokenizer, metrics.jsonl, checkpoints, summary.json) is printed at the "
        "start.",
    ),
    Command(
        "finetune",
        cmd_finetune,
        "fine-tune a trained run on JSONL examples (SFT, DPO or GRPO, optionally LoRA)",
        (
            RUN,
            opt("--data", "JSONL examples or a shipped set (addition2, ...)", required=True),
            opt("--method", "post-training method", choices=["sft", "dpo", "grpo"], default="sft"),
            opt("--lora", "train LoRA adapters (PEFT), not every weight", action="store_true"),
            opt("--teacher", "distil from this run (same tokenizer) while fine-tuning with SFT"),
            QUIET,
        ),
        items="no config (RUN's settings are the base)",
        description="Start a new run from RUN's newest checkpoint (RUN@STEP for another) and "
        "train it on --data with --method, keeping RUN's settings and tokenizer: the same as "
        "lmlab train train.init_from=RUN post.method=METHOD post.data=DATA. Examples: "
        '{"prompt", "completion"} or {"messages": [...]} per line for SFT, {"prompt", "chosen", '
        '"rejected"} for DPO (RUN is the frozen reference), {"prompt", "answer", "verifier"} '
        "for GRPO; see docs/post-training.md.",
        epilog="Example:\n  lmlab finetune runs/base --data addition2 train.max_steps=300",
    ),
    Command(
        "merge",
        cmd_merge,
        "fold a LoRA run's adapters into its weights as a new ordinary run",
        (RUN, opt("--name", "name of the new run (default: RUN-merged)", "name", source=merge_run)),
        description="Write a new run beside RUN (a run fine-tuned with --lora) whose weights are "
        "RUN's newest checkpoint with every adapter merged in (PEFT's merge); its logits equal "
        "the adapted model's. It records RUN as its parent.",
    ),
    Command(
        "eval",
        cmd_eval,
        "validation loss, perplexity and bits per byte of a run",
        (
            RUN,
            opt("--batches", "evaluation batches", "max_batches", type=at_least(1), default=50),
            opt("--split", "split to evaluate", "split", choices=["val", "train"]),
            opt(
                "--seq-len",
                "context of the evaluation windows, 0 for the run's",
                "seq_len",
                type=at_least(0),
                default=0,
            ),
            DEVICE,
            JSON,
        ),
        library=evaluate,
        description="Evaluate a run's newest valid checkpoint on its validation split.",
    ),
    Command(
        "generate",
        cmd_generate,
        "sample text from a run",
        (
            RUN,
            opt("--prompt", "text to continue", default="\n"),
            opt(
                "--max-new-tokens",
                "tokens to sample",
                "max_new_tokens",
                source=stream_tokens,
                type=at_least(0),
                default=200,
            ),
            opt("--temperature", "0 is greedy", "temperature", type=float),
            opt("--top-k", "keep the k likeliest, 0 is off", "top_k", type=int),
            opt("--top-p", "nucleus mass, 1 is off", "top_p", type=float),
            opt("--min-p", "min-p filter, 0 is off", "min_p", type=float),
            dataclasses.replace(SAMPLER_SEED, source=stream_tokens),
            DEVICE,
        ),
        library=SamplingSettings,
        description="Sample from a run with its state/KV cache (one prefill, then one token "
        "per step).",
    ),
    Command(
        "export",
        cmd_export,
        "write a trained BitLinear run as packed ternary weights (safetensors)",
        (
            RUN,
            opt("--format", "export format: ternary", "fmt"),
            opt("--out", "file to write (replaced atomically)", "out", required=True),
        ),
        library=export_run,
        description="Write a run's newest valid checkpoint as one safetensors file: every\n"
        "BitLinear weight packed (2 bits per weight) with its scale, every other tensor as is,\n"
        "the config and tokenizer in the metadata. Needs a run trained with\n"
        "model.bitlinear=true. See docs/bitlinear.md.",
        epilog="Example:\n"
        "  lmlab export runs/gpt-tiny-20260101-120000 --format ternary --out tiny.safetensors",
    ),
    Command(
        "presets",
        cmd_presets,
        "list the shipped presets (docs/presets/<name>.md has their figures)",
    ),
    Command(
        "info",
        cmd_info,
        "parameters and FLOPs of a config without training it, or the registered mixers",
        (
            PRESET,
            opt(
                "--mixers",
                "list every registered token and channel mixer instead",
                action="store_true",
            ),
        ),
        items=f"a preset or YAML file ({DEFAULT_PRESET})",
        description="Parameters and FLOPs per token of the model a run of the config would "
        "train; the vocabulary is resolved as training does (the config's tokenizer is built "
        "on its data, a BPE one trained). With --mixers, list the registered mixers instead.",
    ),
    Command(
        "compare",
        cmd_compare,
        "compare configs at a matched budget over several seeds, with a verdict",
        (
            BUDGET,
            SEEDS,
            opt(
                "--variant",
                "add an arm: the first config plus this override (repeatable)",
                "variants",
                action="append",
                metavar="KEY=VALUE",
            ),
            opt("--baseline", "arm the others are judged against (the first)", "baseline"),
            opt(
                "--rule",
                "YAML promotion rule: metric, min_effect, confidence, interval, probe_tolerance "
                "(default val_bits_per_byte, 0.01, 0.95, t, 0.02)",
                "rule",
            ),
            OUT,
            opt(
                "--parallel",
                "train K runs at once, each an 'lmlab train' process sharing the cores "
                "(0: one after another in this process)",
                "parallel",
                type=int,
                metavar="K",
            ),
            opt(
                "--target-loss",
                "validation bits per byte for 'time to target' (the baseline's median final)",
                "target",
                type=positive_float,
                metavar="BPB",
            ),
            REGISTRY,
            QUIET,
        ),
        library=plan_compare,
        items="arms (presets or YAML files); overrides apply to every arm",
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
    ),
    Command(
        "scale",
        cmd_scale,
        "train a size x tokens grid, fit a scaling law, predict a held-out larger run",
        (
            PRESET,
            opt(
                "--sizes",
                "model sizes, e.g. d_model=32,48,64 (model.* keys; repeat the flag to grow "
                "several keys together, e.g. --sizes n_layers=2,3,4)",
                "sizes",
                action="append",
                default=[],
                metavar="KEY=V1,V2,...",
            ),
            opt("--tokens", "training-token budgets, e.g. 200k,400k", "tokens"),
            opt(
                "--holdout",
                "a larger run to predict before it trains, e.g. 'd_model=96 tokens=800k'",
                "holdout",
                metavar="'KEY=V tokens=N'",
            ),
            SEEDS,
            OUT,
            REGISTRY,
            QUIET,
        ),
        library=plan_scale,
        items=f"a preset or YAML file ({DEFAULT_PRESET}); overrides apply to every run",
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
    ),
    Command(
        "search",
        cmd_search,
        "search a config space with Optuna (TPE, successive-halving pruning)",
        (
            opt("space", "YAML file: base config, fixed overrides, parameter ranges"),
            opt("--trials", "trials in total", "trials", type=int, default=20),
            dataclasses.replace(BUDGET, kwargs={"required": True}),
            dataclasses.replace(SAMPLER_SEED, help="sampler seed"),
            OUT,
            REGISTRY,
            QUIET,
        ),
        library=plan_search,
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
    ),
    Command(
        "runs",
        cmd_runs,
        "list runs and comparisons recorded in the run registry",
        (
            opt(
                "location",
                "runs folder holding registry.sqlite, or the database file "
                "(default: $LMLAB_REGISTRY or runs/registry.sqlite)",
                nargs="?",
            ),
            opt(
                "--filter",
                "keep rows whose column equals VALUE (* and ? match anything), e.g. arm=base, "
                "status=failed; repeatable",
                "filters",
                action="append",
                metavar="KEY=VALUE",
            ),
            opt("--compare", "only the runs of this comparison", "compare", metavar="NAME"),
            JSON,
        ),
        library=list_runs,
        description="List the runs in the SQLite run registry, newest first.",
    ),
    Command(
        "probe",
        cmd_probe,
        "synthetic capability probes (MQAR, induction, copying, needle) or loss by position",
        (
            opt(
                "--task",
                "mqar, induction, selective_copy, needle or loss_by_position",
                default="mqar",
            ),
            opt("--seq-len", "sequence length", "seq_len", type=at_least(1), default=256),
            opt(
                "--kv-pairs",
                "kv pairs (mqar) or tokens to copy",
                "items",
                type=int,
                aliases=("num_kv_pairs",),
            ),
            opt("--vocab", "vocabulary size", "vocab_size", type=at_least(1)),
            opt("--examples", "training examples", "num_examples", type=at_least(1)),
            opt(
                "--epochs",
                "passes over the examples",
                "epochs",
                type=int,
                default=16,
                source=run_probe,
            ),
            opt("--lrs", "learning-rate sweep", "lrs", default="1e-3,3e-3,1e-2", source=run_probe),
            opt("--batch-size", "examples per step", "batch_size", type=int, source=run_probe),
            opt(
                "--warmup",
                "fraction of the steps of linear warmup",
                "warmup",
                type=float,
                source=run_probe,
            ),
            opt(
                "--evals-per-epoch",
                "test-set checks per epoch (screened on 128 examples, confirmed on all); "
                "training stops at the first that solves",
                "evals_per_epoch",
                type=int,
                source=run_probe,
            ),
            opt("--lengths", "needle: test lengths, e.g. 64,128,256 (--seq-len)"),
            SAMPLER_SEED,
            opt(
                "--buckets",
                "loss_by_position buckets",
                "buckets",
                type=at_least(1),
                source=run_loss_by_position,
            ),
            opt(
                "--out",
                "folder for probes.json and the per-lr table (e.g. a run)",
                "out",
                source=run_probe,
            ),
        ),
        library=ProbeTask,
        items="a preset or YAML file (a run folder for loss_by_position)",
        description="Train the config's architecture from scratch on a synthetic task at each\n"
        "learning rate and report held-out accuracy (best of the sweep; solved at >= 0.99).\n"
        "With --task loss_by_position, CONFIG is a run folder: mean validation loss per\n"
        "position bucket at 1x, 2x and 4x its training length. See docs/probes.md.",
        epilog="Examples:\n"
        "  lmlab probe gpt-tiny model.d_model=64 --task mqar --seq-len 256 --kv-pairs 16\n"
        "  lmlab probe my.yaml --task needle --seq-len 256 --lengths 64,128,256 --out runs/x\n"
        "  lmlab probe runs/gpt-tiny-20260101-120000 --task loss_by_position",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    for command in COMMANDS:
        sub = commands.add_parser(
            command.name,
            help=command.help,
            description=command.description,
            epilog=command.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter
            if "\n" in (command.description or "") + (command.epilog or "")
            else argparse.HelpFormatter,
        )
        for option in command.options:
            option.add(sub, command.library)
        if command.items:
            sub.add_argument(
                ITEMS,
                nargs="*",
                metavar="CONFIG|KEY=VALUE",
                help=f"{command.items}, and key=value overrides (e.g. model.d_model=64); "
                "before, between or after the options",
            )
        sub.set_defaults(command_spec=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    command: Command = args.command_spec
    try:
        return command.run(args)
    except ParamError as exc:
        print(f"error: {exc.worded(command.flags())}", file=sys.stderr)
        return exc.exit_code
    except LmlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

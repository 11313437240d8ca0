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

from lmlab.data.prepare import prepare_shards
from lmlab.data.tokenizers import KINDS
from lmlab.errors import LmlabError, ParamError
from lmlab.eval.evaluate import evaluate
from lmlab.eval.probes import ProbeTask
from lmlab.experiments.compare import plan_compare
from lmlab.experiments.probe import run_loss_by_position, run_probe
from lmlab.experiments.scale import plan_scale
from lmlab.experiments.search import plan_search
from lmlab.interop.export import export_run
from lmlab.interop.hf import import_hf
from lmlab.interop.lm_eval_tasks import run_lm_eval
from lmlab.memory.knn import KnnSettings
from lmlab.memory.store import build_store
from lmlab.model.generate import SamplingSettings, stream_tokens
from lmlab.model.speculative import SpeculativeStats, stream_speculative
from lmlab.posttrain.merge import merge_run
from lmlab.serve.server import serve
from lmlab.train.quantize import EMBEDDINGS, quantize_run
from lmlab.train.registry import list_runs

if TYPE_CHECKING:
    from lmlab.data.tokenizers import Tokenizer
    from lmlab.memory.store import KnnStore
    from lmlab.model.lm import LanguageModel
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
    "per run: tokens=N (2M), flops=N (training FLOPs, 1e15), time=N (10m, 90s) or steps=N",
    "budget",
)
RUN = opt("run", "run folder")
DEVICE = opt("--device", "cpu, cuda, mps or auto", default="auto")
JSON = opt("--json", "print JSON", action="store_true")
NPROC_PER_RUN = opt(
    "--nproc-per-run",
    "processes per run, each run a torchrun job (train.parallel=ddp unless the config says fsdp;"
    " compare needs --parallel)",
    "nproc_per_run",
    type=int,
    metavar="N",
)
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


def train_argv(args: argparse.Namespace) -> list[str]:
    """``lmlab train`` arguments that repeat ``args`` without ``--nproc`` (what each process of
    the job runs)."""
    argv = ["train"]
    for flag, value in (("--preset", args.preset), ("--config", args.config)):
        if value:
            argv += [flag, value]
    if args.resume:
        argv += ["--resume", args.resume]
    if args.quiet:
        argv.append("--quiet")
    return argv + args.configs + args.overrides


def cmd_train(args: argparse.Namespace) -> int:
    from lmlab.distributed.group import launch, launched_ranks, leave

    if args.nproc > 1:
        if launched_ranks().several:
            raise LmlabError("--nproc starts torchrun itself; drop it when launching with torchrun")
        return launch(args.nproc, train_argv(args))
    try:
        return train_here(args)
    finally:
        leave()


def train_here(args: argparse.Namespace) -> int:
    """Train in this process (one of several under torchrun: rank 0 alone prints)."""
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
    from lmlab.distributed.group import launched_ranks
    from lmlab.train.adapters import trainable_parameters

    run_dir, config, tokenizer = trainer.run_dir, trainer.config, trainer.tokenizer
    model, main_rank = trainer.model, launched_ranks().main
    mixers = config.model.layer_mixers()
    processes = f" x {trainer.ranks.world_size} processes ({config.train.parallel})"
    if main_rank:
        print(
            f"run {run_dir}: {model.num_parameters() / 1e6:.2f}M parameters, "
            f"{tokenizer.kind} tokenizer ({tokenizer.vocab_size}), {trainer.device}"
            f"{processes if trainer.ranks.several else ''}, {trainer.precision}, layers "
            f"{mixers[0] if len(set(mixers)) == 1 else ','.join(mixers)}",
            file=sys.stderr,
        )
    if trainer.adapter is not None and main_rank:
        trained, total = trainable_parameters(model)
        print(
            f"LoRA: {trained:,} of {total:,} parameters train ({trained / total:.2%}), "
            f"rank {config.post.lora_rank}, base {config.post.quantize_base}",
            file=sys.stderr,
        )
    try:
        summary = trainer.train()
    except KeyboardInterrupt:
        if main_rank:
            print(f"\ninterrupted; continue with: lmlab train --resume {run_dir}", file=sys.stderr)
        return 130
    if main_rank:
        accuracy = summary.get("val_accuracy")
        print(
            f"done: {summary['steps']} steps, {summary['tokens']} tokens in "
            f"{summary['train_seconds']:.1f}s ({summary['tokens_per_s'] / 1000:.1f}k tok/s); "
            f"val loss {summary['val_loss']:.4f}, {summary['val_bits_per_byte']:.4f} bits/byte"
            + ("" if accuracy is None else f", accuracy {accuracy:.1%}")
        )
        print(f"run folder: {run_dir}")
    return 0


def knn_settings(args: argparse.Namespace) -> KnnSettings | None:
    """The kNN-LM settings when ``--memory`` is given; ``--knn-*`` options without it are an
    error rather than silently ignored."""
    settings = KnnSettings(args.knn_lambda, args.knn_k, args.knn_temperature)
    if args.memory is None:
        if settings != KnnSettings():
            raise LmlabError("--knn-lambda, --knn-k and --knn-temperature need --memory INDEX")
        return None
    settings.validate()
    return settings


def open_memory(args: argparse.Namespace, model: LanguageModel, tokenizer: Tokenizer) -> KnnStore:
    """The store of ``--memory``, checked against the run's model and tokenizer."""
    from lmlab.memory.store import open_store

    store = open_store(args.memory)
    store.check_model(model.cfg.d_model, tokenizer, args.run)
    return store


def cmd_merge(args: argparse.Namespace) -> int:
    run_dir = merge_run(args.run, args.name)
    print(f"merged run: {run_dir}")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    import json

    result = run_lm_eval(
        args.run,
        args.tasks,
        tasks_path=args.tasks_path,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=args.device,
        registry=args.registry,
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.run} @ step {result['step']}: lm-eval in {result['seconds']:.1f}s")
    for task, metrics in result["tasks"].items():
        shown = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        print(f"  {task}: {shown}")
    print(f"scores written to {Path(args.run) / 'lm_eval.json'} and the run registry")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    if args.tasks is not None:
        return cmd_lm_eval(args)

    from lmlab.data.dataset import prepare_data, with_source
    from lmlab.memory.knn import evaluate_with_memory
    from lmlab.train.device import autocast, pick_device, resolve_precision
    from lmlab.train.run import load_trained_model

    settings = knn_settings(args)
    device = pick_device(args.device)
    config, model, tokenizer, step = load_trained_model(args.run, device)
    store = open_memory(args, model, tokenizer) if settings else None
    data, _ = prepare_data(with_source(config.data, args.data), tokenizer)
    precision = resolve_precision(config.train.precision, device)
    window = {
        "batch_size": config.train.batch_size,
        "seq_len": args.seq_len or config.data.seq_len,
        "max_batches": args.max_batches,
        "device": device,
        "split": args.split,
    }
    if store is None:
        result = evaluate(model, data, autocast=autocast(device, precision), **window)
    else:
        if store.manifest["split"] == args.split and store.manifest["data"] == args.data:
            print(
                f"warning: {args.memory} was built from the {args.split} split being evaluated: "
                "the memory holds the answers",
                file=sys.stderr,
            )
        result = evaluate_with_memory(model, data, store, settings, **window)
    result["step"] = step
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{args.run} @ step {step} ({args.split}, {result['tokens']} tokens): "
        f"loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.2f}, "
        f"{result['bits_per_byte']:.4f} bits/byte"
    )
    if store is not None:
        print(
            f"with memory {args.memory} ({store.size} entries, lambda {settings.knn_lambda}, "
            f"k {settings.knn_k}, temperature {settings.knn_temperature}): "
            f"loss {result['memory_loss']:.4f}, perplexity {result['memory_perplexity']:.2f}, "
            f"{result['memory_bits_per_byte']:.4f} bits/byte "
            f"({result['memory_bits_per_byte'] - result['bits_per_byte']:+.4f})"
        )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from lmlab.data.tokenizers import warn_unknown
    from lmlab.memory.knn import knn_hook
    from lmlab.train.device import pick_device
    from lmlab.train.run import load_draft, load_trained_model

    settings = SamplingSettings(args.temperature, args.top_k, args.top_p, args.min_p)
    settings.validate()
    memory = knn_settings(args)
    if memory and args.draft:
        raise LmlabError("--draft and --memory do not combine yet; give one of them")
    device = pick_device(args.device)
    _, model, tokenizer, _ = load_trained_model(args.run, device)
    hook = knn_hook(open_memory(args, model, tokenizer), memory) if memory else None
    ids = tokenizer.encode_array(args.prompt)
    warn_unknown(tokenizer, [ids], "the prompt")
    if not len(ids):
        raise LmlabError("--prompt is empty after tokenisation; give at least one character")
    prompt = torch.tensor([ids.tolist()], device=device)
    stats = SpeculativeStats()
    if args.draft:
        draft = load_draft(args.draft, model, tokenizer, device)
        tokens = stream_speculative(
            model,
            draft,
            prompt,
            args.max_new_tokens,
            settings,
            args.draft_tokens,
            args.seed,
            stats,
            args.draft_confidence,
        )
    else:
        tokens = stream_tokens(model, prompt, args.max_new_tokens, settings, args.seed, hook)
    sys.stdout.write(args.prompt)
    new_ids: list[int] = []
    printed = ""
    for token in tokens:
        new_ids.append(int(token))
        text = tokenizer.decode(new_ids)
        sys.stdout.write(text[len(printed) :])
        sys.stdout.flush()
        printed = text
    sys.stdout.write("\n")
    if args.draft:
        print(
            f"speculative: {stats.accepted}/{stats.drafted} drafted tokens accepted "
            f"({stats.acceptance_rate:.0%}), {stats.tokens_per_round:.2f} tokens per "
            "verification",
            file=sys.stderr,
        )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    serve(
        args.run,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_tokens_limit=args.max_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens,
        max_concurrent=args.max_concurrent,
        max_body_bytes=args.max_body_bytes,
        prefill_chunk=args.prefill_chunk,
        device=args.device,
        draft=args.draft,
        draft_tokens=args.draft_tokens,
        memory=args.memory,
        knn=knn_settings(args),
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    result = export_run(args.run, args.out, args.fmt)
    if result["format"] == "hf":
        why = f" (not Llama: {', '.join(result['not_llama'])})" if result["not_llama"] else ""
        print(
            f"{result['out']}: step {result['step']}, model_type {result['model_type']}{why}, "
            f"{result['bytes'] / 1024:.1f} KiB of weights"
        )
        return 0
    print(
        f"{result['out']}: step {result['step']}, {result['ternary_layers']} ternary layers, "
        f"{result['bytes'] / 1024:.1f} KiB (fp32 checkpoint model: "
        f"{result['checkpoint_bytes'] / 1024:.1f} KiB, "
        f"{result['checkpoint_bytes'] / result['bytes']:.1f}x larger)"
    )
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    try:
        summary = prepare_shards(
            args.source,
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            tokenizer_from=args.tokenizer_from,
            workers=args.workers,
            text_field=args.text_field,
            val_fraction=args.val_fraction,
            seed=args.seed,
            shard_mb=args.shard_mb,
            sample_mb=args.sample_mb,
            show_progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to continue", file=sys.stderr)
        return 130
    reused = f", {summary['skipped']} reused" if summary["skipped"] else ""
    print(
        f"{summary['out']}: {summary['tokenizer']} tokenizer, {summary['shards']} shards"
        f"{reused}; train {summary['train_tokens']:,} tokens ({summary['documents']['train']} "
        f"documents), val {summary['val_tokens']:,} tokens ({summary['documents']['val']} "
        f"documents) in {summary['seconds']:.1f}s"
    )
    if summary["unknown_tokens"]:
        print(
            f"warning: {summary['unknown_tokens']} tokens are the char tokenizer's unknown id "
            "(characters missing from its training sample; raise --sample-mb)",
            file=sys.stderr,
        )
    print(f"train on it with: lmlab train data.path={summary['out']}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    if args.int8 == args.int4:
        raise LmlabError("give exactly one of --int8 and --int4")
    method = "int8" if args.int8 else "int4"
    result = quantize_run(args.run, args.out, method, args.group_size, args.embeddings)
    group = f", groups of {result['group_size']}" if result["group_size"] else ""
    tied = " (tied: stored once)" if result["tied"] else ""
    smaller = ", ".join(f"{name} g{size}" for name, size in result["smaller_groups"].items())
    kept = f"; kept in float: {', '.join(result['float_layers'])}" if result["float_layers"] else ""
    print(
        f"{result['out']}: {result['method']}{group}, embedding and head "
        f"{result['embeddings']}{tied}, step {result['step']}, "
        f"{result['bytes'] / 1024:.1f} KiB (float checkpoint model: "
        f"{result['source_bytes'] / 1024:.1f} KiB, {result['source_bytes'] / result['bytes']:.1f}x "
        f"larger){f'; smaller groups: {smaller}' if smaller else ''}{kept}"
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    result = import_hf(args.source, args.out)
    print(
        f"run {result['run']}: {result['parameters'] / 1e6:.2f}M parameters, "
        f"{result['layers']} layers, vocabulary {result['vocab_size']}"
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
    from lmlab.data.dataset import fit_vocab, prepare_data
    from lmlab.model.lm import LanguageModel

    if args.mixers:
        print("\n".join(mixer_lines()))
        return 0
    config = build_config(one_config(preset_and_configs(args)), args.overrides)
    _, tokenizer = prepare_data(config.data, None)
    fit_vocab(config, tokenizer)
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
        nproc_per_run=args.nproc_per_run,
        tasks=args.tasks,
        tasks_path=args.tasks_path,
        tasks_limit=args.tasks_limit,
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
        args.space,
        trials=args.trials,
        budget=args.budget,
        out=args.out,
        seed=args.seed,
        nproc_per_run=args.nproc_per_run,
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


def cmd_memory(args: argparse.Namespace) -> int:
    from lmlab.train.device import pick_device

    manifest = build_store(
        args.run,
        args.out,
        data=args.data,
        split=args.split,
        max_tokens=args.max_tokens,
        index=args.index,
        batch_size=args.batch_size,
        device=pick_device(args.device),
        show_progress=not args.quiet,
    )
    seconds = manifest.get("key_seconds", 0.0)
    speed = f", {manifest['entries'] / seconds / 1000:.1f}k keys/s" if seconds else ""
    print(
        f"{args.out}: {manifest['entries']} entries ({manifest['index']} index, "
        f"{manifest['index_bytes'] / 2**20:.1f} MiB) from {manifest['run']} @ step "
        f"{manifest['step']}, {manifest['data']} {manifest['split']} split{speed}"
    )
    return 0


MEMORY_OPTIONS = (
    opt("--memory", "a retrieval store from lmlab memory build (kNN-LM)", metavar="INDEX"),
    opt("--knn-lambda", "weight of the kNN distribution", "knn_lambda", type=float),
    opt("--knn-k", "neighbours per token", "knn_k", type=int),
    opt("--knn-temperature", "divides the squared distances", "knn_temperature", type=float),
)
DATA_SOURCE = opt(
    "--data",
    "text to read: run (the run's data), modern or folio (an embedded edition), or a text "
    "file or folder; split as the run's config says",
    "data",
    source=build_store,
)
KNN = tuple(dataclasses.replace(o, source=KnnSettings) for o in MEMORY_OPTIONS[1:])


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
            opt(
                "--nproc",
                "processes on this machine, started with torchrun (set train.parallel=ddp or fsdp)",
                type=at_least(1),
                default=1,
            ),
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
            DATA_SOURCE,
            MEMORY_OPTIONS[0],
            *KNN,
            opt(
                "--tasks",
                "lm-evaluation-harness tasks, comma-separated (e.g. hellaswag,arc_easy) "
                "instead of the validation split",
                "tasks",
                source=run_lm_eval,
            ),
            opt(
                "--tasks-path",
                "folder of your own lm-eval task YAML files",
                "tasks_path",
                source=run_lm_eval,
            ),
            opt(
                "--limit",
                "lm-eval: examples per task (a quick check; below 1 a fraction)",
                "limit",
                type=positive_float,
                source=run_lm_eval,
            ),
            opt(
                "--num-fewshot",
                "lm-eval: few-shot examples (the task's default)",
                "num_fewshot",
                type=at_least(0),
                source=run_lm_eval,
            ),
            opt(
                "--batch-size",
                "lm-eval: requests per forward",
                "batch_size",
                type=at_least(1),
                source=run_lm_eval,
            ),
            REGISTRY,
            DEVICE,
            JSON,
        ),
        library=evaluate,
        description="Evaluate a run's newest valid checkpoint on its validation split; with\n"
        "--memory, also with a kNN-LM retrieval store mixed in (see docs/memory.md); or with\n"
        "--tasks on lm-evaluation-harness tasks: the scores go to RUN/lm_eval.json and the run\n"
        "registry (see docs/ecosystem.md).",
        epilog="Examples:\n"
        "  lmlab eval runs/gpt-tiny-20260101-120000\n"
        "  lmlab eval runs/gpt-tiny-20260101-120000 --memory store/ --knn-lambda 0.25\n"
        "  lmlab eval runs/gpt-tiny-20260101-120000 --tasks my_task --tasks-path my_tasks\n"
        "  lmlab eval runs/gpt-tiny-20260101-120000 --tasks hellaswag,arc_easy --limit 200",
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
            MEMORY_OPTIONS[0],
            *KNN,
            opt(
                "--draft",
                "speculative decoding: a smaller run with the same tokenizer drafts tokens, "
                "or self:N (early exit after N of the run's own layers)",
                "draft",
                source=stream_speculative,
                default=None,
            ),
            opt(
                "--draft-tokens",
                "tokens the draft proposes per verification",
                "draft_tokens",
                source=stream_speculative,
                type=at_least(1),
            ),
            opt(
                "--draft-confidence",
                "end a round's drafting after a token the draft gives less than this "
                "probability (0: always --draft-tokens)",
                "draft_confidence",
                source=stream_speculative,
                type=float,
            ),
            DEVICE,
        ),
        library=SamplingSettings,
        description="Sample from a run with its state/KV cache (one prefill, then one token\n"
        "per step). With --draft, speculative decoding (Leviathan et al. 2023): the draft\n"
        "proposes --draft-tokens tokens, the run verifies them in one forward; the output\n"
        "follows the run's own distribution (greedy: the same text). See docs/serving.md.",
        epilog="Examples:\n"
        '  lmlab generate runs/gpt-tiny-20260101-120000 --prompt "ROMEO:"\n'
        "  lmlab generate runs/target --draft runs/draft --draft-tokens 4 --temperature 0\n"
        "  lmlab generate runs/target --draft self:2",
    ),
    Command(
        "serve",
        cmd_serve,
        "serve a run over an OpenAI-compatible HTTP API (continuous batching)",
        (
            RUN,
            opt("--host", "address to listen on (loopback only by default)", "host"),
            opt("--port", "TCP port (0: any free one)", "port", type=at_least(0)),
            opt(
                "--api-key",
                "require 'Authorization: Bearer KEY' (default: $LMLAB_API_KEY; none: no auth)",
                "api_key",
                metavar="KEY",
            ),
            opt("--max-batch", "rows decoded together", "max_batch", type=at_least(1)),
            opt(
                "--max-tokens-limit",
                "largest max_tokens a request may ask for",
                "max_tokens_limit",
                type=at_least(1),
            ),
            opt(
                "--max-prompt-tokens",
                "longest prompt in tokens",
                "max_prompt_tokens",
                type=at_least(1),
            ),
            opt(
                "--max-concurrent",
                "requests in flight (running or queued) before 429",
                "max_concurrent",
                type=at_least(1),
            ),
            opt(
                "--max-body-bytes",
                "largest request body before 413",
                "max_body_bytes",
                type=at_least(1),
            ),
            opt(
                "--prefill-chunk",
                "prompt tokens prefilled between two decode steps (bounds the stall)",
                "prefill_chunk",
                type=at_least(1),
            ),
            opt(
                "--draft",
                "speculative decoding (one row at a time): a smaller run with the same "
                "tokenizer drafts tokens, or self:N (early exit after N of the run's layers)",
                "draft",
            ),
            opt(
                "--draft-tokens",
                "tokens the draft proposes per verification",
                "draft_tokens",
                type=at_least(1),
            ),
            dataclasses.replace(MEMORY_OPTIONS[0], param="memory"),
            *KNN,
            DEVICE,
        ),
        library=serve,
        description="Serve a run's newest valid checkpoint over an OpenAI-compatible HTTP API:\n"
        "GET /v1/models, POST /v1/completions and /v1/chat/completions (stream=true for\n"
        "server-sent events), GET /health. Requests join and leave one running batch between\n"
        "decode steps. Chat needs the run's tokenizer/chat_template.jinja. SIGTERM or Ctrl-C\n"
        "lets running requests finish, then exits. --draft decodes speculatively, --memory\n"
        "mixes a kNN-LM retrieval store into every token. See docs/serving.md.",
        epilog="Examples:\n"
        "  lmlab serve runs/gpt-tiny-20260101-120000\n"
        "  lmlab serve runs/gpt-tiny-20260101-120000 --port 8080 --api-key secret --max-batch 16\n"
        "  lmlab serve runs/target --draft runs/draft --draft-tokens 4\n"
        "  lmlab serve runs/gpt-tiny-20260101-120000 --memory store/ --knn-lambda 0.25",
    ),
    Command(
        "export",
        cmd_export,
        "write a run as packed ternary weights or a Hugging Face model folder",
        (
            RUN,
            opt("--format", "export format: ternary or hf", "fmt"),
            opt(
                "--out",
                "file (ternary) or folder (hf) to write; files are replaced atomically",
                "out",
                required=True,
            ),
        ),
        library=export_run,
        description="Write a run's newest valid checkpoint.\n"
        "ternary: one safetensors file, every BitLinear weight packed (2 bits per weight) with\n"
        "its scale, every other tensor as is, the config and tokenizer in the metadata (needs\n"
        "model.bitlinear=true; see docs/bitlinear.md).\n"
        "hf: a transformers folder (config.json, model.safetensors, generation_config.json,\n"
        "tokenizer.json): a plain LlamaForCausalLM when every layer is Llama's, else\n"
        "model_type lmlab, which loads after 'import lmlab'. See docs/ecosystem.md.",
        epilog="Examples:\n"
        "  lmlab export runs/bitnet-run --format ternary --out tiny.safetensors\n"
        "  lmlab export runs/gpt-tiny-20260101-120000 --format hf --out hf-tiny",
    ),
    Command(
        "import",
        cmd_import,
        "turn a local Hugging Face Llama-family model folder into an lmlab run",
        (
            opt("source", "model folder (config.json, model.safetensors, tokenizer.json)"),
            opt("--out", "run folder to create (must not exist)", "out", required=True),
        ),
        library=import_hf,
        description="Read a local LlamaForCausalLM (or Mistral without sliding window) folder\n"
        "and write a run folder (config.yaml, tokenizer/, checkpoints/step_00000000) whose model\n"
        "gives the same logits; lmlab eval, generate, export and lm-eval then work on it.\n"
        "Features lmlab lacks (biases, rope scaling, sliding windows, ...) are refused by\n"
        "name. See docs/ecosystem.md.",
        epilog="Example:\n  lmlab import ~/models/SmolLM2-135M --out runs/smollm2-135m",
    ),
    Command(
        "prepare",
        cmd_prepare,
        "tokenise a corpus into memory-mapped token shards (streaming, parallel, resumable)",
        (
            opt(
                "source", "text/JSONL/Parquet/CSV file, saved datasets folder, or a folder of them"
            ),
            opt("--out", "shard folder to write; run again to resume", "out", required=True),
            opt("--tokenizer", "byte, char or bpe", "tokenizer", choices=list(KINDS)),
            opt("--vocab-size", "BPE vocabulary size", "vocab_size", type=at_least(257)),
            opt(
                "--tokenizer-from",
                "reuse the tokenizer of a run or shard folder instead of training one",
                "tokenizer_from",
                metavar="RUN_OR_SHARDS",
            ),
            opt("--workers", "encoding processes", "workers", type=at_least(1)),
            opt("--text-field", "JSONL field or column holding the text", "text_field"),
            opt(
                "--val-fraction",
                "share of documents (by a hash of their names) for validation",
                "val_fraction",
                type=float,
            ),
            dataclasses.replace(SAMPLER_SEED, help="seed of the train/validation split"),
            opt("--shard-mb", "source megabytes per shard", "shard_mb", type=positive_float),
            opt(
                "--sample-mb",
                "megabytes of training text a char/BPE tokenizer is fitted on",
                "sample_mb",
                type=positive_float,
            ),
            QUIET,
        ),
        library=prepare_shards,
        description="Read SOURCE in parts, encode them in several processes and write\n"
        "OUT/train-NNNNN.bin and val-NNNNN.bin with a manifest (source files, sizes, token\n"
        "counts, SHA-256 checksums, tokenizer) that training checks. A document goes to\n"
        "validation by a hash of its name, so the split is decided while streaming; a single\n"
        "text file is split by its tail. Interrupted? Run the same command again: finished\n"
        "shards are verified and kept. See docs/ecosystem.md.",
        epilog="Examples:\n"
        "  lmlab prepare corpus.jsonl --tokenizer bpe --vocab-size 8000 --out shards/\n"
        "  lmlab prepare texts/ --tokenizer-from runs/gpt-tiny-20260101-120000 --out shards/\n"
        "  lmlab train gpt-tiny data.path=shards/",
    ),
    Command(
        "memory",
        cmd_memory,
        "build a kNN-LM retrieval store (FAISS) from a run's hidden states",
        (
            opt("action", "what to do: build", choices=["build"]),
            RUN,
            DATA_SOURCE,
            opt("--split", "split of the data to store", "split", choices=["train", "val"]),
            opt("--out", "store folder (new, or the one to continue)", "out", required=True),
            opt(
                "--max-tokens", "store at most N entries, 0 for all", "max_tokens", type=at_least(0)
            ),
            opt(
                "--index",
                "flat (exact), ivfpq, or auto (flat below 1M entries)",
                "index",
                choices=["auto", "flat", "ivfpq"],
            ),
            opt("--batch-size", "windows per forward pass", "batch_size", type=at_least(1)),
            DEVICE,
            QUIET,
        ),
        library=build_store,
        description="Run the model over a split and store, for every position, its final\n"
        "hidden state (key) and the next token (value) in a FAISS index on disk. Resumable:\n"
        "run the same command again to continue an interrupted build. See docs/memory.md.",
        epilog="Examples:\n"
        "  lmlab memory build runs/gpt-tiny-20260101-120000 --out store/\n"
        "  lmlab memory build runs/gpt-tiny-20260101-120000 --data folio --out folio-store/\n"
        "  lmlab eval runs/gpt-tiny-20260101-120000 --memory store/ --knn-lambda 0.25",
    ),
    Command(
        "quantize",
        cmd_quantize,
        "write a run with int8 or int4 weights (weight-only, PyTorch CPU kernels)",
        (
            RUN,
            opt("--int8", "int8 weights, one scale per output channel", action="store_true"),
            opt("--int4", "int4 weights, a scale and offset per group", action="store_true"),
            opt(
                "--group-size",
                "int4: inputs per group",
                "group_size",
                type=int,
                choices=[32, 64, 128],
            ),
            opt(
                "--embeddings",
                "how to store the token embedding and output head (int4: with --int4 only)",
                "embeddings",
                choices=list(EMBEDDINGS),
            ),
            opt("--out", "new run folder to write", "out", required=True),
        ),
        library=quantize_run,
        description="Write a new run folder holding the run's newest checkpoint with every\n"
        "linear layer of its blocks quantised, --int8 per output channel or --int4 group-wise\n"
        "(a layer the group does not divide takes the largest smaller group that does), and\n"
        "the output head and token embedding in int8 unless --embeddings says otherwise (a\n"
        "tied embedding and head stored once; norms stay float). lmlab eval, generate and\n"
        "serve load it like any run. See docs/serving.md.",
        epilog="Examples:\n"
        "  lmlab quantize runs/gpt-tiny-20260101-120000 --int8 --out runs/int8\n"
        "  lmlab quantize runs/gpt-tiny-20260101-120000 --int4 --group-size 32 --out runs/int4\n"
        "  lmlab quantize runs/gpt-tiny-20260101-120000 --int4 --embeddings int4 --out runs/q4",
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
            NPROC_PER_RUN,
            opt(
                "--target-loss",
                "validation bits per byte for 'time to target' (the baseline's median final)",
                "target",
                type=positive_float,
                metavar="BPB",
            ),
            opt(
                "--tasks",
                "lm-eval tasks to score every run on, comma-separated: adds a pass/fail "
                "scoreboard per task (tolerance: the rule's probe_tolerance)",
                "tasks",
            ),
            opt("--tasks-path", "folder of your own lm-eval task YAML files", "tasks_path"),
            opt(
                "--tasks-limit",
                "lm-eval examples per task (below 1 a fraction)",
                "tasks_limit",
                type=positive_float,
                aliases=("limit",),
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
        "  lmlab compare a.yaml b.yaml c.yaml --budget flops=1e15 --baseline b --rule rule.yaml\n"
        "  lmlab compare gpt-tiny --variant model.mixer=gla --budget tokens=2M \\\n"
        "      --tasks hellaswag,arc_easy --tasks-limit 500",
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
            NPROC_PER_RUN,
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
        "  lmlab quantize runs/gpt-tiny-20260101-120000 --int8 --out runs/int8\n"
        "  lmlab export runs/bitnet-run --format ternary --out model.safetensors\n"
        "  lmlab export runs/gpt-tiny-20260101-120000 --format hf --out hf-tiny",
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

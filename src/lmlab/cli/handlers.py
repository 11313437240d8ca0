"""What each ``lmlab`` verb does: ``cmd_<name>(args) -> int`` handlers that call the library
(heavy modules imported inside them, so ``lmlab --help`` stays fast), and their shared helpers."""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lmlab.cli.options import DEFAULT_PRESET
from lmlab.data.prepare import prepare_shards
from lmlab.errors import LmlabError
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
from lmlab.train.quantize import quantize_run
from lmlab.train.registry import list_runs

if TYPE_CHECKING:
    from lmlab.data.tokenizers import Tokenizer
    from lmlab.memory.store import KnnStore
    from lmlab.model.lm import LanguageModel
    from lmlab.train.trainer import Trainer


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


def run_study(
    run: Callable[..., dict],
    plan: object,
    args: argparse.Namespace,
    summary_lines: Callable[[dict], list[str]],
    succeeded: Callable[[dict], bool],
) -> int:
    """Run a compare, scale or search plan and print its summary: exit 0 when ``succeeded``
    says so, else 1; on Ctrl-C say how to continue and exit 130."""
    try:
        results = run(plan, show_progress=not args.quiet, registry_location=args.registry)
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to continue", file=sys.stderr)
        return 130
    print("\n".join(summary_lines(results)))
    return 0 if succeeded(results) else 1


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
        draft_confidence=args.draft_confidence,
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
    return run_study(run_compare, plan, args, summary_lines, lambda r: not r["failed"])


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
    return run_study(run_scale, plan, args, summary_lines, lambda r: not r["failed"])


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
    return run_study(run_search, plan, args, summary_lines, lambda r: bool(r["best"]))


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

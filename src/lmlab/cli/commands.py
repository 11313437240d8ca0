"""The table of ``lmlab`` verbs: one :class:`~lmlab.cli.options.Command` row per verb, its
handler, the library function its options mirror, its options, help text and examples."""

from __future__ import annotations

import dataclasses

from lmlab.cli.handlers import (
    cmd_compare,
    cmd_eval,
    cmd_export,
    cmd_finetune,
    cmd_generate,
    cmd_import,
    cmd_info,
    cmd_memory,
    cmd_merge,
    cmd_prepare,
    cmd_presets,
    cmd_probe,
    cmd_quantize,
    cmd_runs,
    cmd_scale,
    cmd_search,
    cmd_serve,
    cmd_train,
)
from lmlab.cli.options import (
    BUDGET,
    DEFAULT_PRESET,
    DEVICE,
    JSON,
    NPROC_PER_RUN,
    OUT,
    PRESET,
    QUIET,
    REGISTRY,
    RUN,
    SAMPLER_SEED,
    SEEDS,
    Command,
    at_least,
    opt,
    positive_float,
)
from lmlab.data.prepare import prepare_shards
from lmlab.data.tokenizers import KINDS
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
from lmlab.model.speculative import stream_speculative
from lmlab.posttrain.merge import merge_run
from lmlab.serve.server import serve
from lmlab.train.quantize import EMBEDDINGS, quantize_run
from lmlab.train.registry import list_runs

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
SPECULATIVE = (
    opt(
        "--draft",
        "speculative decoding (one row at a time): a smaller run with the same tokenizer "
        "drafts tokens, or self:N (early exit after N of the run's own layers)",
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
        "end a round's drafting after a token the draft gives less than this probability "
        "(0: always --draft-tokens)",
        "draft_confidence",
        source=stream_speculative,
        type=float,
    ),
)
"""Speculative decoding, as ``lmlab generate`` and ``lmlab serve`` take it (the defaults of
:func:`~lmlab.model.speculative.stream_speculative`, which ``serve`` shares)."""


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
            *SPECULATIVE,
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
            *SPECULATIVE,
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

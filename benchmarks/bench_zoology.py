"""MQAR time to 0.99: lmlab's probe against HazyResearch/zoology's own trainer, side by side.

Why: issue 5 asks lmlab's probe to reach 0.99 held-out accuracy in at most a third of
zoology's wall time on the same task (MQAR, length 64, 4 kv pairs, vocab 256, 16k training
examples, 1000 test examples, 2 layers of width 64). Each system runs as its own process and is
timed whole (start-up, data generation, training, evaluations) until it exits, which both do at
their first evaluation at or above 0.99: zoology through its ``early_stopping_threshold`` (its
check is ``> 0.99``, evaluated once per epoch), lmlab through the probe's early stop (``>= 0.99``,
evaluated four times per epoch). The two runs of each pair alternate, so the load of other
processes on a shared machine falls on both alike.

Each system keeps its own recipe, as a user of each would run it: zoology's
``original_mqar_configs`` model (a short-convolution layer then the mixer, no MLP, batch 256,
AdamW with cosine decay per epoch, 32 epochs, dropout 0.1 in attention) and lmlab's probe with
the settings its docs recommend for MQAR: no MLP (``model.channel_mixer=none``), a width-3
causal convolution over attention's queries, keys and values
(``model.mixer_options.attention.qkv_conv=3``, lmlab's counterpart of zoology's short
convolution layer), batch 32, no warmup, 16 screened checks per epoch (the default).
``--lmlab-overrides`` and the ``--lmlab-*`` options change that recipe (e.g.
``--lmlab-overrides ""`` for lmlab's default block with its SwiGLU MLP). An upper-case lmlab
side is a ``model.pattern``, e.g. ``HG`` (hyena, which starts with a short convolution, then
GLA: lmlab has no Based).

Zoology needs a CPU-patched scratch checkout and its own venv, outside the repo (see
docs/probes.md for the patches):
    .venv/bin/python benchmarks/bench_zoology.py --zoology /tmp/scratch/zoology \\
        --zoology-python /tmp/scratch/zoo-venv/bin/python
        [--pairs attention:attention,based:HG] [--zoology-lr 1e-2] [--lmlab-lr 1e-2]
        [--lmlab-overrides "..."] [--lmlab-batch-size 32] [--lmlab-warmup 0]
        [--threads 2] [--repeats 1] [--examples 16000]
Prints one row per run and a table: system, mixer, seconds to 0.99, final accuracy, ratio
(lmlab seconds / zoology seconds for the pair; the target is <= 0.33).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SEQ_LEN, KV_PAIRS, VOCAB, TEST_EXAMPLES, WIDTH, LAYERS = 64, 4, 256, 1000, 64, 2
HEADS = 2  # zoology's MHA for MQAR
LMLAB_OVERRIDES = "model.channel_mixer=none model.mixer_options.attention.qkv_conv=3"

# Zoology's sequence mixers as its models_repo.py configures them for MQAR.
ZOOLOGY_MIXERS = {
    "attention": {
        "name": "zoology.mixers.attention.MHA",
        "kwargs": {"dropout": 0.1, "num_heads": 2},
    },
    "based": {
        "name": "zoology.mixers.based.Based",
        "kwargs": {
            "l_max": SEQ_LEN,
            "feature_dim": 16,
            "feature_name": "taylor_exp",
            "num_key_value_heads": 1,
            "num_heads": 1,
            "train_view": "quadratic",
        },
    },
}

ZOOLOGY_CONFIG = """\
from zoology.config import DataConfig, ModelConfig, ModuleConfig, TrainConfig
from zoology.data.multiquery_ar import MQARConfig

task = dict(vocab_size={vocab}, input_seq_len={seq_len}, num_kv_pairs={kv_pairs})
conv = dict(
    name="zoology.mixers.base_conv.BaseConv",
    kwargs=dict(l_max={seq_len}, kernel_size=3, implicit_long_conv=True),
)
configs = [
    TrainConfig(
        data=DataConfig(
            train_configs=[MQARConfig(num_examples={examples}, **task)],
            test_configs=[MQARConfig(num_examples={test_examples}, **task)],
            batch_size=(256, 32),
        ),
        model=ModelConfig(
            d_model={width},
            n_layers={layers},
            vocab_size={vocab},
            max_position_embeddings=0,
            state_mixer=dict(name="torch.nn.Identity", kwargs={{}}),
            sequence_mixer=ModuleConfig(
                name="zoology.mixers.hybrid.Hybrid", kwargs=dict(configs=[conv, {mixer!r}])
            ),
        ),
        learning_rate={lr!r},
        max_epochs={epochs},
        early_stopping_metric="valid/accuracy",
        early_stopping_threshold=0.99,
    )
]
"""


@dataclass
class Result:
    system: str
    mixer: str
    seconds: float
    accuracy: float

    @property
    def solved(self) -> bool:
        return self.accuracy >= 0.99


def timed(command: list[str], cwd: Path | None, env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of the whole process and its combined output; a failure stops the bench."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds, done.stdout + done.stderr


def run_zoology(args: argparse.Namespace, mixer: str, env: dict[str, str], tmp: Path) -> Result:
    config = tmp / f"zoology_{mixer}.py"
    config.write_text(
        ZOOLOGY_CONFIG.format(
            vocab=VOCAB,
            seq_len=SEQ_LEN,
            kv_pairs=KV_PAIRS,
            examples=args.examples,
            test_examples=TEST_EXAMPLES,
            width=WIDTH,
            layers=LAYERS,
            mixer=ZOOLOGY_MIXERS[mixer],
            lr=args.zoology_lr,
            epochs=args.epochs,
        ),
        encoding="utf-8",
    )
    command = [args.zoology_python, "-m", "zoology.launch", str(config)]
    seconds, output = timed(command, Path(args.zoology), env)
    # tqdm's postfix after each evaluation: "valid/accuracy=0.87" (carriage-return separated).
    found = re.findall(r"valid/accuracy=([0-9.]+)", output)
    if not found:
        sys.exit(f"zoology printed no valid/accuracy:\n{output[-2000:]}")
    return Result("zoology", mixer, seconds, float(found[-1]))


def run_lmlab(args: argparse.Namespace, mixer: str, env: dict[str, str], tmp: Path) -> Result:
    out = tmp / f"lmlab_{mixer}"
    command = [
        sys.executable, "-m", "lmlab", "probe", "gpt-tiny",
        f"model.pattern={mixer}" if mixer.isupper() else f"model.mixer={mixer}",
        f"model.d_model={WIDTH}", f"model.n_layers={LAYERS}", f"model.n_heads={HEADS}",
        *args.lmlab_overrides.split(),
        "--task", "mqar", "--seq-len", str(SEQ_LEN), "--kv-pairs", str(KV_PAIRS),
        "--vocab", str(VOCAB), "--examples", str(args.examples), "--epochs", str(args.epochs),
        "--lrs", str(args.lmlab_lr), "--batch-size", str(args.lmlab_batch_size),
        "--warmup", str(args.lmlab_warmup), "--evals-per-epoch", str(args.lmlab_evals_per_epoch),
        "--out", str(out),
    ]  # fmt: skip
    seconds, _ = timed(command, None, env)
    scores = json.loads((out / "probes.json").read_text(encoding="utf-8"))
    return Result("lmlab", mixer, seconds, scores[f"mqar_s{SEQ_LEN}_kv{KV_PAIRS}"])


def table(results: list[Result]) -> str:
    """Markdown table; the ratio is each lmlab run over the zoology run of its pair and repeat."""
    lines = [
        "| system | mixer | seconds to 0.99 | final accuracy | ratio |",
        "|---|---|---|---|---|",
    ]
    for i in range(0, len(results), 2):
        pair = sorted(results[i : i + 2], key=lambda r: r.system != "zoology")
        zoology, lmlab = pair
        for r in pair:
            seconds = f"{r.seconds:.1f}" if r.solved else f"not solved ({r.seconds:.1f})"
            ratio = f"{lmlab.seconds / zoology.seconds:.2f}" if r is lmlab else ""
            lines.append(f"| {r.system} | {r.mixer} | {seconds} | {r.accuracy:.4f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoology", required=True, help="CPU-patched zoology checkout")
    parser.add_argument("--zoology-python", required=True, help="python of zoology's venv")
    parser.add_argument(
        "--pairs",
        default="attention:attention",
        help="zoology mixer:lmlab mixer or layer pattern, comma-separated (zoology: attention "
        "or based; an upper-case lmlab side is model.pattern, e.g. HA = hyena then attention)",
    )
    parser.add_argument("--zoology-lr", type=float, default=1e-2, help="from its sweep")
    parser.add_argument("--lmlab-lr", type=float, default=1e-2)
    parser.add_argument(
        "--lmlab-overrides",
        default=LMLAB_OVERRIDES,
        help=f"key=value settings of the lmlab model ({LMLAB_OVERRIDES})",
    )
    parser.add_argument("--lmlab-batch-size", type=int, default=32)
    parser.add_argument("--lmlab-warmup", type=float, default=0.0)
    parser.add_argument("--lmlab-evals-per-epoch", type=int, default=16, help="(16)")
    parser.add_argument("--epochs", type=int, default=32, help="budget of both (zoology's 32)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of both")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--examples", type=int, default=16_000, help="fewer for a smoke run")
    args = parser.parse_args()
    pairs = [p.split(":") for p in args.pairs.split(",")]
    if any(len(p) != 2 or p[0] not in ZOOLOGY_MIXERS for p in pairs):
        parser.error(f"--pairs takes zoology:lmlab mixers; zoology has {', '.join(ZOOLOGY_MIXERS)}")

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for zoology_mixer, lmlab_mixer in pairs:
                runs = [(run_zoology, zoology_mixer), (run_lmlab, lmlab_mixer)]
                for run, mixer in runs[:: 1 if repeat % 2 == 0 else -1]:
                    result = run(args, mixer, env, Path(folder))
                    results.append(result)
                    print(
                        f"{result.system} {result.mixer}: {result.seconds:.1f}s, "
                        f"accuracy {result.accuracy:.4f}",
                        flush=True,
                    )
    print(table(results))


if __name__ == "__main__":
    main()

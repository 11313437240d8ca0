"""Training architectures on the synthetic probes (:mod:`lmlab.eval.probes` generates the tasks
and scores them): a learning-rate sweep per probe, stopping at the first evaluation where every
test set is solved, and the probe files a run folder keeps (``probes.json``, ``probe-<name>.md``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from lmlab.config.schema import Config, ModelConfig, TrainConfig
from lmlab.errors import LmlabError, ParamError
from lmlab.eval.probes import (
    PROBES_FILE,
    SCREEN_EXAMPLES,
    SCREEN_MARGIN,
    SOLVED,
    ProbeTask,
    Split,
    accuracy,
    loss_by_position,
    scored_logits,
)
from lmlab.files import atomic_write_json, atomic_write_text
from lmlab.model.lm import LanguageModel
from lmlab.train import registry
from lmlab.train.optim import build_optimizers
from lmlab.train.schedule import lr_multiplier
from lmlab.train.step import TrainStep


def train_probe(
    model_cfg: ModelConfig,
    train: Split,
    tests: dict[str, Split],
    *,
    lr: float,
    epochs: int,
    batch_size: int = 64,
    warmup: float = 0.1,
    weight_decay: float = 0.1,
    seed: int = 0,
    evals_per_epoch: int = 16,
) -> dict:
    """Train a fresh model with AdamW (linear warmup over the first ``warmup`` fraction of the
    steps, then cosine decay; the Trainer's step, so auxiliary losses and the feature check
    apply) for up to ``epochs`` passes over ``train``, evaluating
    ``evals_per_epoch`` times per epoch and stopping at the first evaluation where every test
    set is solved.

    Evaluating within epochs matters because a probe is usually solved mid-epoch and the time
    to solve is what a sweep pays for: an evaluation per epoch trains up to an epoch too long.
    Checks within an epoch are screened (:func:`evaluate`), so frequent ones stay cheap; every
    epoch ends with a full evaluation. Returns the best accuracy per test set, the epochs and
    steps run, the seconds and whether it solved."""
    if evals_per_epoch < 1:
        raise ParamError(
            f"<evals_per_epoch>={evals_per_epoch} must be at least 1", "evals_per_epoch"
        )
    if batch_size < 1:
        raise ParamError(f"<batch_size>={batch_size} must be at least 1", "batch_size")
    if not 0.0 <= warmup < 1.0:
        raise ParamError(
            f"<warmup>={warmup} must be a fraction of the steps in [0, 1), e.g. 0.1", "warmup"
        )
    torch.manual_seed(seed)
    model = LanguageModel(model_cfg)
    optimizers = build_optimizers(
        model, TrainConfig(lr=lr, weight_decay=weight_decay, optimizer="adamw")
    )
    steps_per_epoch = math.ceil(len(train[0]) / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup_steps = int(warmup * total_steps)
    eval_every = max(1, steps_per_epoch // evals_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    train_step = TrainStep(model, optimizers, grad_clip=1.0)

    def scored_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(*scored_logits(model, *batch))

    best = dict.fromkeys(tests, 0.0)
    step, started = 0, time.perf_counter()
    model.train()
    while step < total_steps and min(best.values()) < SOLVED:
        order = torch.randperm(len(train[0]), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = (train[0][index], train[1][index])
            train_step(
                step + 1,
                lr_multiplier("cosine", step, step / total_steps, warmup_steps, 0.0, 0.0),
                lambda _micro, batch=batch: batch,
                scored_loss,
            )
            step += 1
            full = step % steps_per_epoch == 0 or step == total_steps
            if (full or step % eval_every == 0) and evaluate(model, tests, best, full):
                break
    return {
        "lr": lr,
        "accuracy": best,
        "epochs": round(step / steps_per_epoch, 2),
        "steps": step,
        "seconds": time.perf_counter() - started,
        "solved": min(best.values()) >= SOLVED,
    }


def evaluate(
    model: LanguageModel, tests: dict[str, Split], best: dict[str, float], full: bool
) -> bool:
    """Update ``best`` with each test set's accuracy and say whether every set is solved.

    Unless ``full``, the first ``SCREEN_EXAMPLES`` of each set are scored first, and the whole
    sets only when every screen is within ``SCREEN_MARGIN`` of solved: a check that would fail
    anyway then costs an eighth of a full evaluation of 1000 examples. Solving is always decided
    on the whole sets, and ``best`` only holds whole-set accuracies."""
    screens = {name: (x[:SCREEN_EXAMPLES], y[:SCREEN_EXAMPLES]) for name, (x, y) in tests.items()}
    if not full and any(accuracy(model, s) < SOLVED - SCREEN_MARGIN for s in screens.values()):
        return False
    for name, split in tests.items():
        best[name] = max(best[name], accuracy(model, split))
    return min(best.values()) >= SOLVED


def probe_model_config(config: Config, task: ProbeTask) -> ModelConfig:
    """The config's architecture with the probe's vocabulary."""
    model_cfg = copy.deepcopy(config.model)
    model_cfg.vocab_size = task.vocab_size
    return model_cfg


def run_probe(
    config: Config,
    task: ProbeTask,
    *,
    epochs: int,
    lrs: Sequence[float],
    batch_size: int = 64,
    warmup: float = 0.1,
    evals_per_epoch: int = 16,
    out: Path | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict:
    """Train the config's architecture on ``task`` at each learning rate (``batch_size``,
    ``warmup`` and ``evals_per_epoch`` as :func:`train_probe`); the score of each probe is its
    best accuracy over the sweep. Writes ``probes.json`` (merged with any scores already there)
    and ``probe-<name>.md`` (the per-lr table) into ``out`` when given."""
    if epochs < 1:
        raise ParamError(f"<epochs>={epochs} must be at least 1", "epochs")
    if not lrs or any(not 0 < lr < math.inf for lr in lrs):
        raise ParamError("<lrs> must list positive learning rates, e.g. 1e-3,3e-3", "lrs")
    tests = task.test_sets()
    train = task.generate(task.num_examples, task.seed)
    model_cfg = probe_model_config(config, task)
    sweep = []
    with recorded_probe(out, task.name(), config) as record:
        for lr in lrs:
            result = train_probe(
                model_cfg,
                train,
                tests,
                lr=lr,
                epochs=epochs,
                batch_size=batch_size,
                warmup=warmup,
                seed=task.seed,
                evals_per_epoch=evals_per_epoch,
            )
            sweep.append(result)
            log(format_result(result))
        scores = {name: max(r["accuracy"][name] for r in sweep) for name in tests}
        report = {"task": task.task, "scores": scores, "sweep": sweep}
        if out is not None:
            write_probe_files(out, task.name(), report)
        record["summary"] = {"train_seconds": sum(r["seconds"] for r in sweep)}
    return report


@contextlib.contextmanager
def recorded_probe(out: Path | None, name: str, config: Config) -> Iterator[dict]:
    """Index a probe sweep written to ``out`` in the run registry of the folder holding ``out``
    (as a run in it would be), from start to end; nothing without ``out``. Its row is keyed by
    the sweep's table ``probe-<name>.md``, not by ``out``: ``out`` is often a trained run whose
    own row (status, results) must stay as it is."""
    if out is None:
        yield {}
        return
    location = registry.run_registry(out.resolve().parent)
    with registry.recording(
        out / f"probe-{name}.md", location, config, arm=f"probe:{name}"
    ) as record:
        yield record


def parse_list(text: str, kind: type, option: str) -> list:
    """A comma-separated command-line list (``1e-3,3e-3``), or a one-line error naming it."""
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        raise LmlabError(
            f"{option}={text!r} must be comma-separated numbers, e.g. {option} 1e-3,3e-3"
        ) from None


def format_result(result: dict) -> str:
    accs = ", ".join(f"{name} {acc:.4f}" for name, acc in result["accuracy"].items())
    status = "solved" if result["solved"] else "not solved"
    return (
        f"lr {result['lr']:g}: {accs} ({status}, {result['epochs']} epochs, "
        f"{result['seconds']:.1f}s)"
    )


def sweep_table(report: dict) -> str:
    """Markdown table: one row per learning rate, one accuracy column per probe."""
    names = list(report["scores"])
    lines = [
        "| lr | " + " | ".join(names) + " | epochs | seconds | solved |",
        "|---" * (len(names) + 4) + "|",
    ]
    for r in report["sweep"]:
        accs = " | ".join(f"{r['accuracy'][n]:.4f}" for n in names)
        lines.append(
            f"| {r['lr']:g} | {accs} | {r['epochs']} | {r['seconds']:.1f} | {r['solved']} |"
        )
    lines.append("| best | " + " | ".join(f"{report['scores'][n]:.4f}" for n in names) + " | | | |")
    return "\n".join(lines)


def write_probe_files(out: Path, name: str, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / PROBES_FILE
    scores = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    scores.update(report["scores"])
    atomic_write_json(path, scores)
    atomic_write_text(out / f"probe-{name}.md", sweep_table(report) + "\n")


def run_loss_by_position(
    run: str | Path, *, factors: Sequence[float] = (1, 2, 4), buckets: int = 8, windows: int = 64
) -> dict:
    """:func:`loss_by_position` of a trained run on its validation split, at its training length
    times each factor; written to ``RUN/loss_by_position.json``."""
    from lmlab.data.dataset import prepare_data
    from lmlab.train.run import load_trained_model

    config, model, tokenizer, step = load_trained_model(run)
    data, _ = prepare_data(config.data, tokenizer)
    train_len = config.data.seq_len
    lengths = [int(train_len * f) for f in factors]
    curves = loss_by_position(model, data.val, lengths, buckets=buckets, max_windows=windows)
    report = {"step": step, "train_seq_len": train_len, "buckets": buckets, "loss": curves}
    path = Path(run) / "loss_by_position.json"
    atomic_write_json(path, report)
    return report

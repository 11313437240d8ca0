"""Synthetic capability probes: recall, induction, selective copying, needle retrieval, and
validation loss by position.

The synthetic probes train each architecture from scratch on generated data, as the Zoology
and Mamba papers do, because a small language model trained on text is too weak for recall
differences to show. Every generator returns ``(inputs, targets)`` of shape ``[N, T]`` where
``targets`` is -100 except at the positions that are scored, so one training loop and one
accuracy serve every task. A probe's score is the best held-out accuracy over a small
learning-rate sweep (the literature reports best-of-sweep).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.config.schema import Config, ModelConfig, TrainConfig
from lmlab.errors import LmlabError
from lmlab.model.lm import LanguageModel
from lmlab.train.optim import build_optimizers
from lmlab.train.schedule import lr_multiplier

IGNORE = -100
SOLVED = 0.99
SCREEN_EXAMPLES = 128
SCREEN_MARGIN = 0.02
"""A screen of 128 MQAR examples has 4 x 128 scored queries: at a true accuracy of 0.99 its
standard error is 0.0044, so a screen below 0.97 is 4.5 standard errors from solved. (A task
with one scored position per example screens less sharply; a screen wrongly failed only delays
the stop to a later check, it never changes a score.)"""
PROBES_FILE = "probes.json"
TASKS = ("mqar", "induction", "selective_copy", "needle")

Split = tuple[torch.Tensor, torch.Tensor]


def _sample_without_replacement(
    rng: np.random.Generator, rows: int, choices: int, size: int, log_p: np.ndarray | None = None
) -> np.ndarray:
    """``size`` distinct indices in ``[0, choices)`` per row, weighted by ``exp(log_p)``.

    Gumbel top-k draws the same distribution as sequential weighted sampling without
    replacement (``np.random.choice(replace=False, p=...)``) but for all rows at once; it runs
    in chunks so a large vocabulary does not need a rows x vocabulary matrix at once.
    """
    out = np.empty((rows, size), dtype=np.int64)
    chunk = max(1, 2**22 // choices)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        scores = rng.gumbel(size=(n, choices))
        if log_p is not None:
            scores += log_p
        top = np.argpartition(-scores, size - 1, axis=1)[:, :size]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start : start + n] = np.take_along_axis(top, order, axis=1)
    return out


def mqar(
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    num_examples: int,
    seed: int = 0,
    power_a: float = 0.01,
) -> Split:
    """Multi-query associative recall as Zoology defines it (``_mqar``).

    The ``num_kv_pairs`` key-value pairs come first (keys from ``[1, V/2)``, values from
    ``[V/2, V)``, all distinct within an example); then every key is queried once, at an even
    offset ``2 * gap`` after the pairs, with ``P(gap = g) ~ (g + 1) ** (power_a - 1)``
    (``power_a`` = 1 is uniform; small values favour short gaps, as repeated bigrams do in text).
    The target at a query is its value; every other position (filled with random tokens) is -100.
    """
    _check_mqar(vocab_size, seq_len, num_kv_pairs)
    rng = np.random.default_rng(seed)
    half = vocab_size // 2
    keys = 1 + _sample_without_replacement(rng, num_examples, half - 1, num_kv_pairs)
    values = half + _sample_without_replacement(rng, num_examples, vocab_size - half, num_kv_pairs)
    context = 2 * num_kv_pairs
    space = (seq_len - context) // 2
    log_p = (power_a - 1) * np.log(np.arange(1, space + 1, dtype=np.float64))
    gaps = _sample_without_replacement(rng, num_examples, space, num_kv_pairs, log_p)

    inputs = rng.integers(0, vocab_size, size=(num_examples, seq_len), dtype=np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    positions = context + 2 * gaps
    np.put_along_axis(inputs, positions, keys, axis=1)
    targets = np.full((num_examples, seq_len), IGNORE, dtype=np.int64)
    np.put_along_axis(targets, positions, values, axis=1)
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def _check_mqar(vocab_size: int, seq_len: int, num_kv_pairs: int) -> None:
    if num_kv_pairs < 1:
        raise LmlabError(f"--kv-pairs={num_kv_pairs} must be at least 1")
    if seq_len < 4 * num_kv_pairs:
        raise LmlabError(
            f"--seq-len={seq_len} is too short for {num_kv_pairs} kv pairs (pairs and queries "
            f"need 4 x pairs); use --seq-len {4 * num_kv_pairs} or fewer --kv-pairs"
        )
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise LmlabError(
            f"--vocab={vocab_size} has too few keys for {num_kv_pairs} distinct pairs; "
            f"use --vocab {2 * num_kv_pairs + 2} or more"
        )


def induction(vocab_size: int, seq_len: int, num_examples: int, seed: int = 0) -> Split:
    """Induction head: token 0 is a trigger that appears once in a random sequence of tokens
    ``[1, V)``, then again at the last position; the target there is the token that followed
    the first trigger."""
    if seq_len < 4 or vocab_size < 3:
        raise LmlabError("induction needs --seq-len >= 4 and --vocab >= 3")
    rng = np.random.default_rng(seed)
    inputs = rng.integers(1, vocab_size, size=(num_examples, seq_len), dtype=np.int64)
    rows = np.arange(num_examples)
    first = rng.integers(0, seq_len - 2, size=num_examples)
    inputs[rows, first] = 0
    inputs[:, -1] = 0
    targets = np.full((num_examples, seq_len), IGNORE, dtype=np.int64)
    targets[:, -1] = inputs[rows, first + 1]
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def selective_copy(
    vocab_size: int, seq_len: int, num_tokens: int, num_examples: int, seed: int = 0
) -> Split:
    """Selective copying (Mamba): ``num_tokens`` data tokens ``[2, V)`` scattered in order among
    noise tokens (0) over the first ``seq_len - num_tokens`` positions, then a delimiter (1);
    from the delimiter on, the targets are the data tokens in order (teacher forcing)."""
    context = seq_len - num_tokens
    if num_tokens < 1 or context < num_tokens or vocab_size < 3:
        raise LmlabError(
            f"--seq-len={seq_len} is too short to copy {num_tokens} tokens; use --seq-len "
            f"{2 * num_tokens} or more (and --vocab >= 3)"
        )
    rng = np.random.default_rng(seed)
    data = rng.integers(2, vocab_size, size=(num_examples, num_tokens), dtype=np.int64)
    slots = np.sort(_sample_without_replacement(rng, num_examples, context, num_tokens), axis=1)
    inputs = np.zeros((num_examples, seq_len), dtype=np.int64)
    np.put_along_axis(inputs, slots, data, axis=1)
    inputs[:, context] = 1
    inputs[:, context + 1 :] = data[:, :-1]
    targets = np.full((num_examples, seq_len), IGNORE, dtype=np.int64)
    targets[:, context:] = data
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def needle(vocab_size: int, seq_len: int, num_examples: int, seed: int = 0) -> Split:
    """Needle in a haystack: random filler ``[2, V)`` holding ``0 key value`` at a random depth;
    the sequence ends with ``1 key`` and the target after the key is the value."""
    if seq_len < 6 or vocab_size < 4:
        raise LmlabError("needle needs --seq-len >= 6 and --vocab >= 4")
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, vocab_size, size=(num_examples, seq_len), dtype=np.int64)
    rows = np.arange(num_examples)
    depth = rng.integers(0, seq_len - 5, size=num_examples)
    key = inputs[rows, depth + 1]
    inputs[rows, depth] = 0
    inputs[:, -2] = 1
    inputs[:, -1] = key
    targets = np.full((num_examples, seq_len), IGNORE, dtype=np.int64)
    targets[:, -1] = inputs[rows, depth + 2]
    return torch.from_numpy(inputs), torch.from_numpy(targets)


@dataclass
class ProbeTask:
    """What to generate: the task and its sizes. ``items`` is the number of kv pairs (mqar) or
    of tokens to copy (selective_copy); ``eval_lengths`` are the lengths a needle is tested at."""

    task: str
    seq_len: int
    vocab_size: int = 8192
    items: int = 16
    num_examples: int = 20000
    test_examples: int = 1000
    seed: int = 0
    power_a: float = 0.01
    eval_lengths: tuple[int, ...] = ()

    def name(self, seq_len: int | None = None) -> str:
        """The probe's key in ``probes.json``: stable across arms so compare can match it."""
        length = seq_len or self.seq_len
        if self.task == "mqar":
            return f"mqar_s{length}_kv{self.items}"
        if self.task == "selective_copy":
            return f"selective_copy_s{length}_n{self.items}"
        return f"{self.task}_s{length}"

    def generate(self, num_examples: int, seed: int, seq_len: int | None = None) -> Split:
        length = seq_len or self.seq_len
        makers: dict[str, Callable[[], Split]] = {
            "mqar": lambda: mqar(
                self.vocab_size, length, self.items, num_examples, seed, self.power_a
            ),
            "induction": lambda: induction(self.vocab_size, length, num_examples, seed),
            "selective_copy": lambda: selective_copy(
                self.vocab_size, length, self.items, num_examples, seed
            ),
            "needle": lambda: needle(self.vocab_size, length, num_examples, seed),
        }
        if self.task not in makers:
            raise LmlabError(f"unknown probe task {self.task!r}; use {', '.join(TASKS)}")
        return makers[self.task]()

    def test_sets(self) -> dict[str, Split]:
        """Held-out sets keyed by probe name (a different seed from training, as Zoology)."""
        lengths = self.eval_lengths or (self.seq_len,)
        return {self.name(n): self.generate(self.test_examples, self.seed + 10, n) for n in lengths}


def scored_logits(
    model: LanguageModel, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[n, vocab]`` and targets ``[n]`` at the scored positions only (``y`` is
    ``IGNORE`` elsewhere): a probe scores a few positions per example, so the head runs on those
    alone (at MQAR's 4 queries in 64 tokens, 1/16 of the head's work)."""
    hidden, _ = model.features(x)
    mask = y != IGNORE
    return model.head(hidden[mask]), y[mask]


@torch.no_grad()
def accuracy(model: LanguageModel, split: Split) -> float:
    """Fraction of scored positions whose argmax prediction is the target."""
    # ~8k tokens per batch: activations that stay in cache run faster than one huge batch.
    batch_size = max(1, 8192 // split[0].shape[1])
    was_training = model.training
    model.eval()
    correct, total = 0, 0
    for start in range(0, len(split[0]), batch_size):
        x, y = split[0][start : start + batch_size], split[1][start : start + batch_size]
        logits, targets = scored_logits(model, x, y)
        correct += int((logits.argmax(-1) == targets).sum())
        total += len(targets)
    model.train(was_training)
    return correct / max(total, 1)


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
    steps, then cosine decay) for up to ``epochs`` passes over ``train``, evaluating
    ``evals_per_epoch`` times per epoch and stopping at the first evaluation where every test
    set is solved.

    Evaluating within epochs matters because a probe is usually solved mid-epoch and the time
    to solve is what a sweep pays for: an evaluation per epoch trains up to an epoch too long.
    Checks within an epoch are screened (:func:`evaluate`), so frequent ones stay cheap; every
    epoch ends with a full evaluation. Returns the best accuracy per test set, the epochs and
    steps run, the seconds and whether it solved."""
    if evals_per_epoch < 1:
        raise LmlabError(f"--evals-per-epoch={evals_per_epoch} must be at least 1")
    if batch_size < 1:
        raise LmlabError(f"--batch-size={batch_size} must be at least 1")
    if not 0.0 <= warmup < 1.0:
        raise LmlabError(f"--warmup={warmup} must be a fraction of the steps in [0, 1), e.g. 0.1")
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
    best = dict.fromkeys(tests, 0.0)
    step, started = 0, time.perf_counter()
    model.train()
    while step < total_steps and min(best.values()) < SOLVED:
        order = torch.randperm(len(train[0]), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(*scored_logits(model, train[0][index], train[1][index]))
            optimizers.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizers.set_lr_multiplier(
                lr_multiplier("cosine", step, step / total_steps, warmup_steps, 0.0, 0.0)
            )
            optimizers.step()
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
        raise LmlabError(f"--epochs={epochs} must be at least 1")
    if not lrs or any(lr <= 0 for lr in lrs):
        raise LmlabError("--lrs must list positive learning rates, e.g. --lrs 1e-3,3e-3")
    tests = task.test_sets()
    train = task.generate(task.num_examples, task.seed)
    model_cfg = probe_model_config(config, task)
    sweep = []
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
    return report


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
    path.write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
    (out / f"probe-{name}.md").write_text(sweep_table(report) + "\n", encoding="utf-8")


@torch.no_grad()
def loss_by_position(
    model: LanguageModel,
    tokens: np.ndarray,
    lengths: Sequence[int],
    *,
    buckets: int = 8,
    max_windows: int = 64,
    batch_size: int = 8,
) -> dict[int, list[float]]:
    """Mean next-token loss in each of ``buckets`` equal position ranges of windows of each
    length: a falling curve means later tokens profit from more context; lengths beyond the
    training length show whether the model extrapolates."""
    from lmlab.data.dataset import eval_batches

    was_training = model.training
    model.eval()
    result = {}
    for length in lengths:
        if length < buckets:
            raise LmlabError(f"length {length} is shorter than --buckets={buckets}")
        total = torch.zeros(length, dtype=torch.float64)
        count = 0
        for x, y in eval_batches(tokens, batch_size, length, math.ceil(max_windows / batch_size)):
            logits, _ = model(x)
            loss = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")
            total += loss.sum(0).double()
            count += x.shape[0]
        edges = np.linspace(0, length, buckets + 1).astype(int)
        per_position = total / count
        result[length] = [float(per_position[a:b].mean()) for a, b in itertools.pairwise(edges)]
    model.train(was_training)
    return result


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
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report

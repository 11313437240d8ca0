"""A run is a folder: ``config.yaml``, ``tokenizer/``, ``metrics.jsonl``, ``checkpoints/`` and
``summary.json``. These helpers create, open, lock and load runs for every command."""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

import torch

from lmlab.config.load import build_config, config_to_dict, dump_config, read_yaml_file
from lmlab.config.schema import Config, ParentRun
from lmlab.data.tokenizers import Tokenizer, load_tokenizer, tokenizer_checksum
from lmlab.distributed.sharded import load_model
from lmlab.errors import LmlabError, ParamError
from lmlab.files import atomic_write_text
from lmlab.model.lm import LanguageModel
from lmlab.model.quantized import quantize_model
from lmlab.model.speculative import Draft, EarlyExit
from lmlab.train.adapters import ADAPTER_DIR, add_lora
from lmlab.train.checkpoint import (
    CHECKPOINTS_DIR,
    Checkpoint,
    list_checkpoints,
    load_checkpoint_at,
    load_latest_checkpoint,
)
from lmlab.train.metrics import read_metrics

CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".lock"
TENSORBOARD_DIR = "tensorboard"
STARTUP_OUTPUTS = (
    TOKENIZER_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    TENSORBOARD_DIR,
    CHECKPOINTS_DIR,
    ADAPTER_DIR,
)
"""What a run writes before its first result (summary.json and the rest come after)."""


class RunHold:
    """This process's exclusive hold on a run folder: an OS lock (``flock``) on its lock file,
    so two processes never write one run, and the OS drops it when the process dies, so even
    ``kill -9`` leaves no stale lock. The lock file holds the holder's pid for the message."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.fresh = False
        """A new run: if it ends before its first checkpoint or evaluation (so with no result
        worth keeping, e.g. a failure at step 0), :meth:`release` removes what it wrote, so the
        same command can run again."""
        path = run_dir / LOCK_FILE
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise LmlabError(f"cannot write in run folder {run_dir} ({exc.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise LmlabError(
                    f"run folder {run_dir} is in use by another lmlab process (pid {holder}); "
                    "wait for it to finish or stop it, then resume"
                ) from None
            if _same_file(fd, path):
                break
            os.close(fd)  # the holder released and removed that file meanwhile: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd: int | None = fd

    def release(self) -> None:
        """Unlock (once); a fresh run without a result first removes what it wrote."""
        if self._fd is None:
            return
        if self.fresh and not self._has_results():
            for name in STARTUP_OUTPUTS:
                path = self.run_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
        if self.fresh and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()
        os.close(self._fd)
        self._fd = None

    def _has_results(self) -> bool:
        """A checkpoint or an evaluation (a pruned search trial keeps its folder)."""
        metrics = self.run_dir / METRICS_FILE
        return bool(list_checkpoints(self.run_dir)) or (
            metrics.is_file() and any(row.get("kind") == "eval" for row in read_metrics(metrics))
        )


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def check_run_name(name: str) -> None:
    """A run name is one plain path component, so a run never lands outside ``out_dir``."""
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise LmlabError(
            f"name={name!r} is not a plain run name; give one folder name without '/', '\\', "
            "'.' or '..' (the run goes in out_dir/name)"
        )


def _refuse_taken(run_dir: Path) -> None:
    if (run_dir / CONFIG_FILE).exists():
        raise LmlabError(
            f"run folder {run_dir} already exists; continue it with --resume {run_dir} "
            "or choose another name=..."
        )
    if any(path.name != LOCK_FILE for path in run_dir.iterdir()):
        raise LmlabError(
            f"{run_dir} exists and is not an lmlab run (no {CONFIG_FILE}); lmlab will not write "
            "into it: choose another name=... or out_dir=..."
        )


def claim_new_run(config: Config, label: str) -> RunHold:
    """A fresh, locked folder for a new run; refuses a folder that holds a run or anything else
    (lmlab never writes into a folder it did not make)."""
    name = config.name or f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_run_name(name)
    run_dir = Path(config.out_dir) / name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LmlabError(
            f"cannot create run folder {run_dir} ({exc.strerror}); out_dir={config.out_dir} "
            "must be a writable folder"
        ) from None
    _refuse_taken(run_dir)  # before locking too: a foreign folder gets not even a lock file
    hold = RunHold(run_dir)
    try:
        _refuse_taken(run_dir)  # again under the lock: another process may have started it
    except LmlabError:
        hold.release()
        raise
    hold.fresh = True
    return hold


def save_run_config(run_dir: Path, config: Config) -> None:
    atomic_write_text(run_dir / CONFIG_FILE, dump_config(config))


def open_run(path: str | Path) -> tuple[Path, Config]:
    """The run folder and its saved config, or a one-line error if it is not a run."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise LmlabError(f"run folder {run_dir} does not exist; give a folder made by lmlab train")
    if not (run_dir / CONFIG_FILE).is_file():
        raise LmlabError(
            f"{run_dir} is not an lmlab run (no {CONFIG_FILE}); give a folder made by lmlab train"
        )
    return run_dir, build_config(base=read_yaml_file(run_dir / CONFIG_FILE))


def run_tokenizer(run_dir: Path, config: Config) -> Tokenizer:
    """The run's tokenizer, refused if the model's embedding cannot hold its ids."""
    if not (run_dir / TOKENIZER_DIR).is_dir():
        raise LmlabError(f"{run_dir} has no tokenizer/ folder; the run never started training")
    tokenizer = load_tokenizer(run_dir / TOKENIZER_DIR)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise LmlabError(
            f"the tokenizer in {run_dir / TOKENIZER_DIR} has {tokenizer.vocab_size} tokens but "
            f"the run's model.vocab_size is {config.model.vocab_size}; it is another run's "
            "tokenizer: restore this run's tokenizer/ folder"
        )
    return tokenizer


def run_origin(config: Config, tokenizer: Tokenizer) -> dict:
    """What a checkpoint was trained with, stored in it so a resume or load can tell when the
    folder's config.yaml or tokenizer/ was edited or swapped afterwards."""
    return {"config": config_to_dict(config), "tokenizer": tokenizer_checksum(tokenizer)}


def check_tokenizer_origin(run_dir: Path, tokenizer: Tokenizer, checkpoint: Checkpoint) -> None:
    """Refuse a tokenizer other than the one the checkpoint was trained with (checkpoints
    written before lmlab stored their origin carry none and pass)."""
    origin = checkpoint.trainer.get("origin")
    if origin is not None and origin["tokenizer"] != tokenizer_checksum(tokenizer):
        raise LmlabError(
            f"the tokenizer in {run_dir / TOKENIZER_DIR} is not the one {checkpoint.path.name} "
            "was trained with (another run's?); restore this run's tokenizer/ folder"
        )


def load_trained_model(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[Config, LanguageModel, Tokenizer, int]:
    """Config, model with the newest valid checkpoint's weights, tokenizer, and its step."""
    config, model, tokenizer, checkpoint = load_run_checkpoint(path, device)
    return config, model, tokenizer, checkpoint.step


def load_run_checkpoint(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[Config, LanguageModel, Tokenizer, Checkpoint]:
    """As ``load_trained_model``, with the checkpoint itself (its folder, step and tensors)."""
    run_dir, config = open_run(path)
    tokenizer = run_tokenizer(run_dir, config)
    checkpoint = load_latest_checkpoint(run_dir)
    if checkpoint is None:
        raise LmlabError(f"{run_dir} has no valid checkpoint yet; train it longer or resume it")
    check_tokenizer_origin(run_dir, tokenizer, checkpoint)
    model = build_model(config)
    quantization = checkpoint.trainer.get("quantization")
    if quantization:  # a run written by lmlab quantize: the same layers, then its weights
        if torch.device(device).type != "cpu":
            raise LmlabError(
                f"{run_dir} is quantised for PyTorch's CPU kernels; load it with --device cpu"
            )
        # absent from runs quantised before the embedding could be: theirs is float
        embedding_bits = quantization.get("embedding_bits")
        quantize_model(model, quantization["bits"], quantization["group_size"], embedding_bits)
    if checkpoint.sharded is not None:
        load_model(model, checkpoint.sharded)
    else:
        load_weights(model, checkpoint.model, run_dir)
    model.to(device).eval()
    return config, model, tokenizer, checkpoint


def build_model(config: Config) -> LanguageModel:
    """The model of a run's config: a LanguageModel, with PEFT LoRA adapters (and an int8
    frozen base) for a LoRA run, whose checkpoints hold them."""
    model = LanguageModel(config.model)
    if config.post.lora:
        add_lora(model, config.post)
    return model


def load_weights(model: LanguageModel, weights: dict[str, torch.Tensor], run_dir: Path) -> None:
    """Load a checkpoint's weights, explaining a mismatch instead of dumping key lists."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise LmlabError(
            f"checkpoint in {run_dir} does not fit its config.yaml (e.g. {first}); "
            "the config was edited after training: restore it"
        )
    model.load_state_dict(weights)


def split_init_spec(spec: str) -> tuple[Path, int | None]:
    """``RUN`` or ``RUN@STEP`` -> the run folder and the step (None: the newest checkpoint)."""
    path, at, step = spec.rpartition("@")
    if at and step.isdigit():
        return Path(path), int(step)
    if at and path and not Path(spec).exists():
        raise LmlabError(
            f"train.init_from={spec!r}: {step!r} after '@' is not a step; give RUN or RUN@STEP, "
            "e.g. runs/base@500"
        )
    return Path(spec), None


def open_parent(spec: str) -> tuple[Path, Config, Tokenizer, Checkpoint]:
    """The run named by ``train.init_from`` (its folder, config, tokenizer and the checkpoint
    to start from), or a one-line error naming the setting."""
    path, step = split_init_spec(spec)
    try:
        run_dir, config = open_run(path)
        tokenizer = run_tokenizer(run_dir, config)
        checkpoint = (
            load_latest_checkpoint(run_dir) if step is None else load_checkpoint_at(run_dir, step)
        )
    except LmlabError as exc:
        raise LmlabError(f"train.init_from={spec}: {exc}") from None
    if checkpoint is None:
        raise LmlabError(f"train.init_from={spec}: {run_dir} has no valid checkpoint yet")
    check_tokenizer_origin(run_dir, tokenizer, checkpoint)
    return run_dir.resolve(), config, tokenizer, checkpoint


def first_mismatch(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> str | None:
    """The first parameter (in the model's order) that ``weights`` lacks or shapes otherwise,
    else the first tensor of ``weights`` the model has no place for, in words; None if all fit."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in weights:
            return f"{name} is missing from the checkpoint"
        if weights[name].shape != tensor.shape:
            return (
                f"{name} has shape {tuple(weights[name].shape)} in the checkpoint but "
                f"{tuple(tensor.shape)} in this model"
            )
    extra = next((name for name in weights if name not in expected), None)
    return None if extra is None else f"{extra} is in the checkpoint but not in this model"


def load_parent_weights(model: LanguageModel, parent: ParentRun) -> None:
    """Load the weights of ``parent`` (a started run's record of ``train.init_from``) into
    ``model``; the architecture must match parameter for parameter."""
    checkpoint = load_checkpoint_at(Path(parent.run), parent.step)
    weights = with_new_token_rows(model, checkpoint.model)
    mismatch = first_mismatch(model, weights)
    if mismatch:
        raise LmlabError(
            f"train.init_from={parent.run}@{parent.step} does not fit this model: {mismatch}; "
            "give the parent's model settings (start without a config to take them all)"
        )
    model.load_state_dict(weights)


VOCABULARY_ROWS = ("embed.weight", "head.weight")


def with_new_token_rows(
    model: LanguageModel, weights: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``weights`` with the embedding and head grown to the model's vocabulary when a
    fine-tuning run added special tokens (a chat template's) after the parent's ids: the new
    rows start at the mean of the parent's rows, as transformers' ``resize_token_embeddings``
    does, so a new token starts as an average token rather than noise. The one difference from
    the parent a run may have; any other still fails :func:`first_mismatch`."""
    expected = model.state_dict()
    grown = dict(weights)
    for name in VOCABULARY_ROWS:
        old, new = weights.get(name), expected.get(name)
        if old is None or new is None or old.shape[1:] != new.shape[1:]:
            continue
        if new.shape[0] > old.shape[0]:
            mean = old.mean(0, keepdim=True).expand(new.shape[0] - old.shape[0], -1)
            grown[name] = torch.cat([old, mean.to(old.dtype)])
    return grown


SELF_DRAFT = "self:"


def load_draft(
    spec: str, model: LanguageModel, tokenizer: Tokenizer, device: torch.device | str = "cpu"
) -> Draft:
    """The draft of speculative decoding for ``model``: ``self:N`` drafts with its own first N
    layers (early exit through the shared head, LayerSkip-style), anything else is a run
    folder, which must have been trained with the same tokenizer."""
    if spec.startswith(SELF_DRAFT):
        layers, depth = spec[len(SELF_DRAFT) :], len(model.blocks)
        if not (layers.isdigit() and 1 <= int(layers) < depth):
            raise ParamError(
                f"<draft>={spec}: give self:N with N in 1..{depth - 1} (the model has {depth} "
                "layers; the draft exits below the last)",
                "draft",
            )
        return EarlyExit(model, int(layers))
    _, draft, draft_tokenizer, _ = load_trained_model(spec, device)
    if tokenizer_checksum(draft_tokenizer) != tokenizer_checksum(tokenizer):
        raise LmlabError(
            f"the draft run {spec} has another tokenizer ({draft_tokenizer.kind}, "
            f"{draft_tokenizer.vocab_size} tokens) than the model ({tokenizer.kind}, "
            f"{tokenizer.vocab_size} tokens); train the draft on the same data and tokenizer"
        )
    return draft

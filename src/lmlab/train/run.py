"""A run is a folder: ``config.yaml``, ``tokenizer/``, ``metrics.jsonl``, ``checkpoints/`` and
``summary.json``. These helpers create, open and load runs for every command."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lmlab.config.load import build_config, dump_config, read_yaml_file
from lmlab.config.schema import Config
from lmlab.data.tokenizers import Tokenizer, load_tokenizer
from lmlab.errors import LmlabError
from lmlab.model.lm import LanguageModel
from lmlab.train.checkpoint import Checkpoint, atomic_write_text, load_latest_checkpoint

CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def new_run_dir(config: Config, label: str) -> Path:
    """A fresh folder for a new run; refuses to reuse one that already holds a run."""
    name = config.name or f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(config.out_dir) / name
    if (run_dir / CONFIG_FILE).exists():
        raise LmlabError(
            f"run folder {run_dir} already exists; continue it with --resume {run_dir} "
            "or choose another name=..."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


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


def run_tokenizer(run_dir: Path) -> Tokenizer:
    if not (run_dir / TOKENIZER_DIR).is_dir():
        raise LmlabError(f"{run_dir} has no tokenizer/ folder; the run never started training")
    return load_tokenizer(run_dir / TOKENIZER_DIR)


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
    tokenizer = run_tokenizer(run_dir)
    checkpoint = load_latest_checkpoint(run_dir)
    if checkpoint is None:
        raise LmlabError(f"{run_dir} has no valid checkpoint yet; train it longer or resume it")
    model = LanguageModel(config.model)
    load_weights(model, checkpoint.model, run_dir)
    model.to(device).eval()
    return config, model, tokenizer, checkpoint


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

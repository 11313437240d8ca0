"""Start or resume a run: the glue between a config, the data, a run folder and the Trainer,
shared by ``lmlab train`` and every command that trains (compare, probes, sweeps)."""

from __future__ import annotations

import shutil
import sys

from lmlab.config.load import build_config, config_to_dict
from lmlab.config.schema import Config
from lmlab.data.dataset import prepare_data
from lmlab.errors import LmlabError
from lmlab.train.checkpoint import load_latest_checkpoint
from lmlab.train.run import (
    CONFIG_FILE,
    TOKENIZER_DIR,
    new_run_dir,
    open_run,
    run_tokenizer,
    save_run_config,
)
from lmlab.train.trainer import Trainer

RESUMABLE_KEYS = (
    "train.max_steps",
    "train.max_tokens",
    "train.max_time",
    "train.eval_interval",
    "train.eval_batches",
    "train.checkpoint_interval",
    "train.keep_checkpoints",
    "train.tensorboard",
    "train.threads",
    "train.compile",
    "train.device",
)
"""Settings that may change when a run is resumed: the budget and bookkeeping, nothing that
changes what a step computes."""


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("letters", "mixer_options"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def new_trainer(config: Config, label: str, show_progress: bool = True) -> Trainer:
    """A trainer for a new run folder (named from ``config.name`` or ``label`` and the time)."""
    data, tokenizer = prepare_data(config.data, None)
    if config.model.vocab_size == 0:
        config.model.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise LmlabError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size}; set model.vocab_size=0 to take the tokenizer's"
        )
    config.validate()
    run_dir = new_run_dir(config, label)
    try:
        tokenizer.save(run_dir / TOKENIZER_DIR)
        save_run_config(run_dir, config)
        return Trainer(config, run_dir, data, tokenizer, None, show_progress=show_progress)
    except BaseException:
        # A run that cannot start leaves nothing of its own (a caller's log file stays).
        shutil.rmtree(run_dir / TOKENIZER_DIR, ignore_errors=True)
        (run_dir / CONFIG_FILE).unlink(missing_ok=True)
        if not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise


def resume_trainer(
    path: str, overrides: list[str] | tuple[str, ...] = (), show_progress: bool = True
) -> Trainer:
    """A trainer that continues a run folder from its newest valid checkpoint."""
    run_dir, saved = open_run(path)
    config = build_config(base=config_to_dict(saved), overrides=overrides)
    before, after = _flatten(config_to_dict(saved)), _flatten(config_to_dict(config))
    changed = [k for k in after if after[k] != before.get(k) and k not in RESUMABLE_KEYS]
    if changed:
        raise LmlabError(
            f"cannot change {changed[0]} when resuming (it changes what a step computes); "
            "start a new run instead, or change only the budget (train.max_steps, ...)"
        )
    tokenizer = run_tokenizer(run_dir)
    checkpoint = load_latest_checkpoint(run_dir)
    if checkpoint is None:
        print(f"no valid checkpoint in {run_dir}; starting it from step 0", file=sys.stderr)
    data, tokenizer = prepare_data(config.data, tokenizer)
    save_run_config(run_dir, config)
    return Trainer(config, run_dir, data, tokenizer, checkpoint, show_progress=show_progress)

"""Start or resume a run: the glue between a config, the data, a run folder and the Trainer,
shared by ``lmlab train`` and every command that trains (compare, probes, sweeps)."""

from __future__ import annotations

import sys
from pathlib import Path

from lmlab.config.load import build_config, config_to_dict
from lmlab.config.schema import Config
from lmlab.data.dataset import prepare_data
from lmlab.errors import LmlabError
from lmlab.train.checkpoint import Checkpoint, list_checkpoints, load_latest_checkpoint
from lmlab.train.run import (
    CONFIG_FILE,
    TOKENIZER_DIR,
    RunHold,
    check_tokenizer_origin,
    claim_new_run,
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
    hold = claim_new_run(config, label)
    run_dir = hold.run_dir
    try:
        try:
            tokenizer.save(run_dir / TOKENIZER_DIR)
            save_run_config(run_dir, config)
        except OSError as exc:
            raise LmlabError(f"cannot write run folder {run_dir} ({exc.strerror})") from None
        return Trainer(config, run_dir, data, tokenizer, None, show_progress, hold=hold)
    except BaseException:
        hold.release()  # a run that cannot start leaves nothing of its own
        raise


def resume_trainer(
    path: str, overrides: list[str] | tuple[str, ...] = (), show_progress: bool = True
) -> Trainer:
    """A trainer that continues a run folder from its newest valid checkpoint."""
    run_dir, saved = open_run(path)
    config = build_config(base=config_to_dict(saved), overrides=overrides)
    before = _flatten(config_to_dict(saved))
    changed = _first_change(before, _flatten(config_to_dict(config)))
    if changed:
        raise LmlabError(
            f"cannot change {changed} when resuming (it changes what a step computes); "
            "start a new run instead, or change only the budget (train.max_steps, ...)"
        )
    hold = RunHold(run_dir)
    try:
        tokenizer = run_tokenizer(run_dir, config)
        checkpoint = load_latest_checkpoint(run_dir)
        if checkpoint is None and list_checkpoints(run_dir):
            raise LmlabError(
                f"every checkpoint in {run_dir} is corrupt (see above), so it cannot resume; "
                "the folder was left as it is: start a new run or restore a checkpoint"
            )
        if checkpoint is None:
            print(f"no checkpoint in {run_dir} yet; starting it from step 0", file=sys.stderr)
        elif checkpoint.trainer.get("quantization"):
            raise LmlabError(
                f"{run_dir} was written by lmlab quantize and has no float weights to train; "
                "resume the run it was quantised from"
            )
        else:
            check_tokenizer_origin(run_dir, tokenizer, checkpoint)
            _check_config_origin(run_dir, before, checkpoint)
        data, tokenizer = prepare_data(config.data, tokenizer)
        save_run_config(run_dir, config)
        return Trainer(config, run_dir, data, tokenizer, checkpoint, show_progress, hold=hold)
    except BaseException:
        hold.release()
        raise


def _first_change(before: dict, after: dict) -> str | None:
    """The first setting that differs, ignoring those a resume may change."""
    keys = [*before, *(key for key in after if key not in before)]
    return next(
        (k for k in keys if before.get(k) != after.get(k) and k not in RESUMABLE_KEYS), None
    )


def _check_config_origin(run_dir: Path, saved: dict, checkpoint: Checkpoint) -> None:
    """Refuse a config.yaml edited after ``checkpoint`` was written (checkpoints written before
    lmlab stored their origin carry none and pass)."""
    origin = checkpoint.trainer.get("origin")
    if origin is None:
        return
    trained = _flatten(config_to_dict(build_config(base=origin["config"])))
    changed = _first_change(trained, saved)
    if changed:
        raise LmlabError(
            f"{run_dir / CONFIG_FILE} was edited after {checkpoint.path.name} was written: "
            f"{changed} is {saved.get(changed)!r}, the checkpoint was trained with "
            f"{trained.get(changed)!r}; restore it (a resume may change only "
            f"{', '.join(RESUMABLE_KEYS)}, as key=value overrides)"
        )

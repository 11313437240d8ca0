"""Start or resume a run: the glue between a config, the data, a run folder and the Trainer,
shared by ``lmlab train`` and every command that trains (compare, probes, sweeps)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from lmlab.config.load import build_config, config_to_dict
from lmlab.config.schema import Config, ParentRun
from lmlab.data.dataset import fit_vocab, prepare_data
from lmlab.data.tokenizers import Tokenizer
from lmlab.distributed.group import join, rank_zero_decides
from lmlab.errors import LmlabError
from lmlab.train.checkpoint import Checkpoint, list_checkpoints, load_latest_checkpoint
from lmlab.train.device import pick_device
from lmlab.train.registry import config_hash
from lmlab.train.run import (
    CONFIG_FILE,
    TOKENIZER_DIR,
    RunHold,
    check_tokenizer_origin,
    claim_new_run,
    open_parent,
    open_run,
    run_tokenizer,
    save_run_config,
    split_init_spec,
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
    "train.parallel",
    "train.comm_timeout",
)
"""Settings that may change when a run is resumed: the budget and bookkeeping, nothing that
changes what a step computes (checkpoints hold the whole state, so a run saved by N processes
continues in M, with DDP or FSDP alike)."""


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("letters", "mixer_options"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def parent_config(source: str | None, overrides: list[str] | tuple[str, ...]) -> Config:
    """The config of a new run: ``source`` plus ``overrides``; without a source, a run started
    from another (``train.init_from``) takes that run's settings as its base, so only what
    changes (data, budget, learning rate) needs saying."""
    config = build_config(source, overrides)
    if source or not config.train.init_from:
        return config
    _, saved = open_run(split_init_spec(config.train.init_from)[0])
    base = config_to_dict(saved)
    base.pop("name")
    base.pop("parent")
    return build_config(base=base, overrides=overrides)


def start_from_parent(config: Config) -> Tokenizer | None:
    """For ``train.init_from``: record the parent in ``config.parent`` and return its tokenizer,
    which the new run must keep (token ids must mean what the weights learned); None without."""
    if not config.train.init_from:
        config.parent = ParentRun()
        return None
    run_dir, saved, tokenizer, checkpoint = open_parent(config.train.init_from)
    config.parent = ParentRun(str(run_dir), checkpoint.step, config_hash(saved))
    if config.model.vocab_size == 0:
        config.model.vocab_size = saved.model.vocab_size
    return tokenizer


def join_job(config: Config) -> None:
    """Join the other processes of a ``torchrun`` job (nothing for one process)."""
    train = config.train
    join(train.parallel, pick_device(train.device), train.comm_timeout)


def new_trainer(
    config: Config,
    label: str,
    show_progress: bool = True,
    tokenizer: Tokenizer | None = None,
    save_extra: Callable[[Path], None] | None = None,
) -> Trainer:
    """A trainer for a new run folder (named from ``config.name`` or ``label`` and the time).

    Pretraining reads ``config.data`` and trains a tokenizer on it unless one is given (a run
    started from another keeps the parent's). A post-training method reads its own examples,
    with ``tokenizer`` (the parent's, possibly with special tokens added) and ``save_extra``,
    which writes what it needs beside the tokenizer (e.g. the chat template) in the new folder's
    ``tokenizer/``. In a job of several processes rank 0 prepares the data, claims and fills the
    folder; the other ranks then read its config and tokenizer from there, so all train the
    same thing."""
    config.validate()
    join_job(config)
    mine: dict = {}
    """Rank 0's hold, data and tokenizer."""

    def claim() -> str:
        parent_tokenizer = start_from_parent(config)
        chosen = tokenizer or parent_tokenizer
        if config.post.method == "none":
            data, chosen = prepare_data(config.data, chosen)
        else:
            data = None
            config.model.vocab_size = max(config.model.vocab_size, chosen.vocab_size)
        fit_vocab(config, chosen)
        config.validate()
        hold = claim_new_run(config, label)
        try:
            chosen.save(hold.run_dir / TOKENIZER_DIR)
            if save_extra is not None:
                save_extra(hold.run_dir / TOKENIZER_DIR)
            save_run_config(hold.run_dir, config)
        except OSError as exc:
            hold.release()
            raise LmlabError(f"cannot write run folder {hold.run_dir} ({exc.strerror})") from None
        except BaseException:
            hold.release()
            raise
        mine.update(hold=hold, data=data, tokenizer=chosen)
        return str(hold.run_dir)

    run_dir = Path(rank_zero_decides(claim))
    hold = mine.get("hold")
    try:
        if hold is None:
            run_dir, config = open_run(run_dir)
            data, run_tok = prepare_data(config.data, run_tokenizer(run_dir, config))
            return Trainer(config, run_dir, data, run_tok, None, show_progress, hold=None)
        data, chosen = mine["data"], mine["tokenizer"]
        return Trainer(config, run_dir, data, chosen, None, show_progress, hold=hold)
    except BaseException:
        if hold is not None:
            hold.release()  # a run that cannot start leaves nothing of its own
        raise


def resume_trainer(
    path: str, overrides: list[str] | tuple[str, ...] = (), show_progress: bool = True
) -> Trainer:
    """A trainer that continues a run folder from its newest valid checkpoint (in any number
    of processes: every rank reads it, rank 0 alone locks and writes the folder)."""
    run_dir, saved = open_run(path)
    config = build_config(base=config_to_dict(saved), overrides=overrides)
    before = _flatten(config_to_dict(saved))
    changed = _first_change(before, _flatten(config_to_dict(config)))
    if changed:
        raise LmlabError(
            f"cannot change {changed} when resuming (it changes what a step computes); "
            "start a new run instead, or change only the budget (train.max_steps, ...)"
        )
    config.validate()
    join_job(config)
    held: list[RunHold] = []
    rank_zero_decides(lambda: held.append(RunHold(run_dir)))  # the lock: rank 0's alone
    hold = held[0] if held else None
    try:
        tokenizer = run_tokenizer(run_dir, config)
        checkpoint = load_latest_checkpoint(run_dir)
        if checkpoint is None and list_checkpoints(run_dir):
            raise LmlabError(
                f"every checkpoint in {run_dir} is corrupt (see above), so it cannot resume; "
                "the folder was left as it is: start a new run or restore a checkpoint"
            )
        if checkpoint is None:
            if hold is not None:
                print(f"no checkpoint in {run_dir} yet; starting it from step 0", file=sys.stderr)
        elif checkpoint.trainer.get("quantization"):
            raise LmlabError(
                f"{run_dir} was written by lmlab quantize and has no float weights to train; "
                "resume the run it was quantised from"
            )
        else:
            check_tokenizer_origin(run_dir, tokenizer, checkpoint)
            _check_config_origin(run_dir, before, checkpoint)
        if config.post.method == "none":
            data, tokenizer = prepare_data(config.data, tokenizer)
        else:
            data = None
        if hold is not None:
            save_run_config(run_dir, config)
        return Trainer(config, run_dir, data, tokenizer, checkpoint, show_progress, hold=hold)
    except BaseException:
        if hold is not None:
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

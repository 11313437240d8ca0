"""Merge a LoRA run's adapters into its weights: a new, ordinary run folder whose model has
no adapters, for eval, generate, compare, export, serving, or as another run's parent."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from lmlab.config.schema import ParentRun
from lmlab.data.chat import CHAT_TEMPLATE_FILE
from lmlab.errors import LmlabError
from lmlab.files import atomic_write_json
from lmlab.train import registry
from lmlab.train.adapters import merge_lora
from lmlab.train.checkpoint import capture_rng_state, save_checkpoint
from lmlab.train.run import (
    SUMMARY_FILE,
    TOKENIZER_DIR,
    claim_new_run,
    load_run_checkpoint,
    run_origin,
    save_run_config,
)


def merge_run(run: str | Path, name: str = "") -> Path:
    """Write ``<name>`` (default ``<run>-merged``) beside the LoRA run ``run``: its newest
    checkpoint with every adapter folded into its base weight (an int8 base is dequantised
    first). The new run records ``run`` as its parent; returns its folder."""
    config, model, tokenizer, checkpoint = load_run_checkpoint(run)
    source = Path(run).resolve()
    if not config.post.lora:
        raise LmlabError(f"{run} is not a LoRA run (post.lora=false): it has no adapters to merge")
    merge_lora(model)
    merged = copy.deepcopy(config)
    merged.post.lora, merged.post.quantize_base = False, "none"
    merged.name = name or f"{source.name}-merged"
    merged.out_dir = str(source.parent)
    merged.train.init_from = f"{source}@{checkpoint.step}"
    merged.parent = ParentRun(str(source), checkpoint.step, registry.config_hash(config))
    hold = claim_new_run(merged, "merged")
    run_dir = hold.run_dir
    try:
        tokenizer.save(run_dir / TOKENIZER_DIR)
        template = source / TOKENIZER_DIR / CHAT_TEMPLATE_FILE
        if template.is_file():
            shutil.copyfile(template, run_dir / TOKENIZER_DIR / CHAT_TEMPLATE_FILE)
        save_run_config(run_dir, merged)
        state = {"step": checkpoint.step, "origin": run_origin(merged, tokenizer)}
        save_checkpoint(
            run_dir, checkpoint.step, model.state_dict(), {}, state, rng=capture_rng_state()
        )
        summary_path = source / SUMMARY_FILE
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        summary.update(run=str(run_dir), parent=vars(merged.parent), merged_from=str(source))
        summary["parameters"] = model.num_parameters()
        atomic_write_json(run_dir / SUMMARY_FILE, summary)
        row = registry.run_row(run_dir, status="finished", config=merged, summary=summary)
        registry.record_runs([row], registry.run_registry(run_dir.parent))
    finally:
        hold.release()
    return run_dir

"""Run folders with a randomly initialised model, for the interop tests (export, lm-eval):
what those read is a checkpoint, and training one would only cost time."""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.config.load import build_config
from lmlab.data.tokenizers import train_tokenizer
from lmlab.model.lm import LanguageModel
from lmlab.train.checkpoint import save_checkpoint
from lmlab.train.run import claim_new_run, run_origin, save_run_config

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 8


def make_run(out: Path, name: str, tokenizer: str = "char", overrides: tuple = ()) -> Path:
    """A run folder holding a randomly initialised model (init_std 0.3, so greedy decoding has
    clear winners) saved as checkpoint step 1: what export reads, without training."""
    texts = [TEXT]
    tok = train_tokenizer(tokenizer, texts, vocab_size=300)
    settings = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.init_std=0.3"]
    config = build_config("gpt-tiny", [*settings, *overrides, f"out_dir={out}", f"name={name}"])
    config.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = LanguageModel(config.model)
    hold = claim_new_run(config, name)
    try:
        tok.save(hold.run_dir / "tokenizer")
        save_run_config(hold.run_dir, config)
        save_checkpoint(
            hold.run_dir, 1, model.state_dict(), {}, {"origin": run_origin(config, tok)}
        )
    finally:
        hold.release()
    return hold.run_dir

"""Hugging Face export/import fidelity and lm-eval cost on small trained runs; prints Markdown.

1. For each architecture, train a tiny run on the embedded corpus, export it with
   ``lmlab export --format hf``, load it with ``AutoModelForCausalLM`` and compare with lmlab on
   validation text: the largest absolute logit difference (float32) and whether 64 greedy
   tokens agree.
2. Save a randomly initialised ``LlamaForCausalLM`` (GQA, untied head) with a byte-level BPE
   tokenizer, ``lmlab import`` it, and compare the logits the same way.
3. Time ``lmlab eval --tasks`` on the YAML tasks of tests/data/lm_eval (multiple choice and
   generation), run from the repository root.

    python benchmarks/bench_interop.py --steps 100
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from timing import machine, print_table
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lmlab.config.load import build_config
from lmlab.interop.export import export_run
from lmlab.interop.hf import import_hf
from lmlab.interop.lm_eval_tasks import run_lm_eval
from lmlab.model.generate import SamplingSettings, generate
from lmlab.train.launch import new_trainer
from lmlab.train.run import load_trained_model

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURES = {
    "llama (attention, GQA)": ["model.n_kv_heads=2"],
    "attention, window 32": ["model.mixer_options.attention.window=32"],
    "gla": ["model.mixer=gla"],
    "hybrid mamba2/attention": ["model.pattern=MA"],
    "moe": ["model.channel_mixer=moe"],
}
TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "data.seq_len=64"]
TEXT = "ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    return parser.parse_args()


def logit_gap(run: Path, folder: Path) -> tuple[str, float, bool]:
    """Model type, max |logit difference| on TEXT, and whether 64 greedy tokens agree."""
    _, model, tokenizer, _ = load_trained_model(run)
    hf = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        gap = (model(ids)[0] - hf(ids).logits).abs().max().item()
        ours = generate(model, ids, 64, SamplingSettings(temperature=0))
        theirs = hf.generate(ids, max_new_tokens=64, do_sample=False)
    return hf.config.model_type, gap, torch.equal(ours, theirs)


def export_rows(scratch: Path, steps: int) -> list[tuple]:
    rows = []
    for name, overrides in ARCHITECTURES.items():
        budget = [f"train.max_steps={steps}", "train.max_time=0", "train.eval_interval=50"]
        settings = [*TINY, *overrides, *budget, f"out_dir={scratch}"]
        config = build_config("gpt-tiny", [*settings, f"name=r{len(rows)}", "train.threads=2"])
        trainer = new_trainer(config, "bench", show_progress=False)
        trainer.train()
        folder = scratch / f"hf{len(rows)}"
        export_run(trainer.run_dir, folder, "hf")
        model_type, gap, same = logit_gap(trainer.run_dir, folder)
        rows.append((name, model_type, f"{gap:.2e}", "yes" if same else "NO"))
    return rows


def import_row(scratch: Path) -> tuple:
    hf_tok = HFTokenizer(models.BPE())
    hf_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf_tok.train_from_iterator([TEXT * 20], trainer=trainer)
    source = scratch / "llama"
    PreTrainedTokenizerFast(tokenizer_object=hf_tok).save_pretrained(source)
    config = LlamaConfig(
        vocab_size=hf_tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(source)
    run = import_hf(source, scratch / "imported")["run"]
    model_type, gap, same = logit_gap(Path(run), source)
    return ("LlamaForCausalLM -> lmlab import", model_type, f"{gap:.2e}", "yes" if same else "NO")


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(machine())
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        os.environ["HF_HOME"] = str(scratch / "hf-home")
        rows = export_rows(scratch, args.steps)
        rows.append(import_row(scratch))
        print_table(["model", "model_type", "max abs logit diff", "64 greedy tokens equal"], rows)
        os.chdir(ROOT)
        tasks = ROOT / "tests" / "data" / "lm_eval"
        start = time.perf_counter()
        result = run_lm_eval(
            scratch / "r0",
            "lmlab_test_mc,lmlab_test_gen",
            tasks_path=str(tasks),
            registry=str(scratch / "registry.sqlite"),
        )
        total = time.perf_counter() - start
        print()
        print_table(
            ["lm-eval tasks", "inside simple_evaluate (s)", "run_lm_eval in all (s)"],
            [("lmlab_test_mc + lmlab_test_gen", f"{result['seconds']:.2f}", f"{total:.2f}")],
        )


if __name__ == "__main__":
    main()

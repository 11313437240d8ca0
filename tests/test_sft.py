"""SFT: the loss reaches completion tokens only, `lmlab finetune` writes an ordinary run that
learns, chats grow the vocabulary by the template's tokens, and a run killed with SIGKILL
resumes to the losses of an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlab.cli import main
from lmlab.config.schema import ModelConfig
from lmlab.data.chat import ChatTemplate
from lmlab.model.lm import LanguageModel
from lmlab.posttrain.batches import pad_examples
from lmlab.posttrain.datasets import shipped_path
from lmlab.posttrain.sft import completion_loss
from lmlab.train.checkpoint import load_latest_checkpoint
from lmlab.train.run import load_trained_model


def test_prompt_tokens_get_no_loss():
    """The loss equals cross-entropy over completion tokens alone, and logits at prompt (and
    padding) positions get exactly zero gradient: whatever the prompt's next tokens are, they
    change nothing."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2))
    ids = [np.array([1, 2, 3, 4, 5, 6]), np.array([7, 8, 9])]
    trained = [np.array([0, 0, 0, 1, 1, 1], bool), np.array([0, 1, 1], bool)]
    batch = pad_examples(ids, trained)
    captured = {}

    def forward(x):
        logits, state = model(x)
        logits.retain_grad()
        captured["logits"] = logits
        return logits, state

    loss = completion_loss(forward, batch, torch.autocast("cpu", enabled=False))
    loss.backward()
    logits = captured["logits"]
    manual = torch.cat(
        [
            F.cross_entropy(logits[0, 2:5], torch.tensor([4, 5, 6]), reduction="none"),
            F.cross_entropy(logits[1, 0:2], torch.tensor([8, 9]), reduction="none"),
        ]
    ).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    grad = logits.grad
    assert torch.all(grad[0, :2] == 0) and torch.all(grad[1, 2:] == 0)  # prompt and padding
    assert grad[0, 2:].abs().sum() > 0 and grad[1, :2].abs().sum() > 0


@pytest.fixture
def base(arithmetic_base: Path) -> Path:
    return arithmetic_base


FINETUNE = ["train.eval_interval=10", "train.warmup_steps=2", "post.eval_examples=20"]


def test_finetune_writes_an_ordinary_run_that_learns(base, tmp_path, capsys):
    out = f"out_dir={tmp_path}"
    settings = [*FINETUNE, "train.max_steps=20", "train.lr=3e-3", out, "name=sft"]
    assert main(["finetune", str(base), "--data", "addition2", *settings]) == 0
    run = tmp_path / "sft"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {
        "kind": "data",
        "step": 0,
        "train": {"examples": 2000, "truncated": 0, "truncated_tokens": 0, "dropped": 0},
        "val": {"examples": 200, "truncated": 0, "truncated_tokens": 0, "dropped": 0},
    }
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in evals)
    train = [r for r in rows if r["kind"] == "train"]
    assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:5]])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["train"]["examples"] == 2000 and "val_accuracy" in summary
    assert summary["parent"]["run"] == str(base.resolve())
    config, _, _, step = load_trained_model(run)
    assert (config.post.method, config.post.data, step) == ("sft", "addition2", 20)
    capsys.readouterr()
    assert main(["eval", str(run), "--batches", "1", "--json"]) == 0  # on the parent's text
    assert json.loads(capsys.readouterr().out)["step"] == 20
    assert main(["generate", str(run), "--prompt", "12+34=", "--max-new-tokens", "3"]) == 0


def test_chat_examples_add_the_template_tokens_and_grow_the_embedding(base, tmp_path):
    data = tmp_path / "chat.jsonl"
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"{a}+1="},
                {"role": "assistant", "content": str(a + 1)},
            ]
        }
        for a in range(10, 40)
    ]
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    settings = ["train.max_steps=2", "post.eval_examples=4", f"out_dir={tmp_path}", "name=chat"]
    assert main(["finetune", str(base), "--data", str(data), "--quiet", *settings]) == 0
    run = tmp_path / "chat"
    template = ChatTemplate.load(run / "tokenizer")
    assert template == ChatTemplate()
    _, parent_model, parent_tokenizer, _ = load_trained_model(base)
    config, _, tokenizer, _ = load_trained_model(run)
    assert tokenizer.special_tokens == tuple(template.special_tokens)
    assert config.model.vocab_size == parent_tokenizer.vocab_size + 4 == tokenizer.vocab_size
    ids = tokenizer.encode("<|assistant|>")
    assert ids == [parent_tokenizer.vocab_size + 2]
    # the new rows started as the mean of the parent's (checked on the child's first weights)
    from lmlab.config.schema import ParentRun
    from lmlab.train.run import load_parent_weights

    fresh = LanguageModel(config.model)
    load_parent_weights(fresh, ParentRun(**vars(config.parent)))
    old = parent_model.embed.weight
    torch.testing.assert_close(fresh.embed.weight[: len(old)], old)
    torch.testing.assert_close(fresh.embed.weight[len(old) :], old.mean(0).expand(4, -1))


def test_bad_examples_are_one_line_and_leave_no_run(base, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+2="}\n')
    out = [f"out_dir={tmp_path}", "name=bad", "train.max_steps=2"]
    assert main(["finetune", str(base), "--data", str(data), *out]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {data}:2: an instruction example needs field 'completion'; add it"
    assert not (tmp_path / "bad").exists()
    budget = ["train.max_tokens=100", f"out_dir={tmp_path}"]
    assert main(["finetune", str(base), "--data", "addition2", *budget]) == 2
    assert "give train.max_steps" in capsys.readouterr().err


def losses(run: Path) -> list[tuple[float, dict]]:
    """Each step's loss and task metrics (DPO's reward margins, GRPO's rewards, ...) but wall
    times (``*_s``)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        (r["loss"], {k: v for k, v in r.get("task", {}).items() if not k.endswith("_s")})
        for r in rows
        if r["kind"] == "train"
    ]


def finetune_data(method: str, folder: Path) -> str:
    """``addition2``, but for GRPO its prompts with partial-credit rewards (``digit_match``):
    a tiny model's exact-match rewards are all 0, which would teach nothing to check."""
    if method != "grpo":
        return "addition2"
    records = [
        json.loads(line) | {"verifier": "digit_match"}
        for line in shipped_path("addition2", "rl", "train").read_text().splitlines()
    ]
    data = folder / "addition2-digits.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(data)


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_finetune_resumes_after_sigkill_exactly(method, base, tmp_path):
    data = finetune_data(method, tmp_path)
    common = [
        *FINETUNE,
        "train.max_steps=30",
        "train.checkpoint_interval=4",
        "train.deterministic=true",
        "post.eval_examples=0",
        f"out_dir={tmp_path}",
    ]
    assert (
        main(
            [
                "finetune",
                str(base),
                "--method",
                method,
                "--data",
                data,
                "--quiet",
                *common,
                "name=whole",
            ]
        )
        == 0
    )
    command = [
        sys.executable,
        "-m",
        "lmlab",
        "finetune",
        str(base),
        "--method",
        method,
        "--data",
        data,
        "--quiet",
        *common,
        "name=killed",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
            break
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = len(losses(tmp_path / "killed"))
    assert 5 < killed_at < 30, "the kill must land mid-run"
    assert load_latest_checkpoint(tmp_path / "killed").step < 30
    assert main(["train", "--quiet", "--resume", str(tmp_path / "killed")]) == 0
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")


def test_a_resume_before_the_first_step_logs_the_data_row_once(base, tmp_path):
    from lmlab.posttrain.launch import start_run
    from lmlab.train.launch import parent_config

    settings = [f"train.init_from={base}", "post.method=sft", "post.data=addition2"]
    config = parent_config(None, [*settings, "train.max_steps=2", f"out_dir={tmp_path}", "name=r"])
    trainer = start_run(config, "sft", show_progress=False)
    trainer.hold.fresh = False  # as if killed before its first step: the folder stays
    trainer.metrics.close()
    trainer.hold.release()
    assert main(["train", "--quiet", "--resume", str(tmp_path / "r")]) == 0
    rows = [
        json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["kind"] for r in rows].count("data") == 1

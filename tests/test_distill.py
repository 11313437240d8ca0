"""Distillation: the loss is T^2 KL(teacher || student) of temperature-scaled distributions over
the trained tokens, mixed with SFT's loss by alpha; the teacher is frozen and must share the
student's tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY_GRID

from lmlab.cli import main
from lmlab.posttrain.batches import IGNORE
from lmlab.posttrain.distill import distillation_kl
from lmlab.train.run import load_trained_model


def test_distillation_kl_is_hintons_scaled_kl_over_trained_tokens():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, 7, generator=generator, dtype=torch.float64)
    teacher = torch.randn(2, 4, 7, generator=generator, dtype=torch.float64)
    labels = torch.tensor([[IGNORE, 3, 1, IGNORE], [2, IGNORE, IGNORE, 5]])
    temperature = 2.5
    got = distillation_kl(student, teacher, labels, temperature)
    total, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            if labels[b, t] == IGNORE:
                continue
            p = [math.exp(z / temperature) for z in teacher[b, t].tolist()]
            q = [math.exp(z / temperature) for z in student[b, t].tolist()]
            p = [x / sum(p) for x in p]
            q = [x / sum(q) for x in q]
            total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
            count += 1
    assert got.item() == pytest.approx(temperature**2 * total / count, rel=1e-6)  # float32
    assert distillation_kl(teacher, teacher, labels, temperature).item() == pytest.approx(0.0)


def test_finetune_with_a_teacher_mixes_the_losses_and_keeps_the_teacher_frozen(
    arithmetic_base, tmp_path
):
    _, teacher_before, _, _ = load_trained_model(arithmetic_base)
    settings = [
        "--teacher",
        str(arithmetic_base),
        "train.max_steps=6",
        "train.eval_interval=6",
        "post.eval_examples=0",
        "post.distill_alpha=0.25",
        "train.lr=3e-3",
        f"out_dir={tmp_path}",
        "name=student",
    ]
    assert (
        main(["finetune", str(arithmetic_base), "--data", "addition2", "--quiet", *settings]) == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").open()]
    train = [r for r in rows if r["kind"] == "train"]
    first = train[0]
    assert first["task"]["distill_kl"] == pytest.approx(0.0, abs=1e-6)  # student == teacher
    for row in train:
        mixed = 0.75 * row["task"]["cross_entropy"] + 0.25 * row["task"]["distill_kl"]
        assert row["loss"] == pytest.approx(mixed, rel=1e-5)
    assert train[-1]["task"]["distill_kl"] > 0
    _, teacher_after, _, _ = load_trained_model(arithmetic_base)
    for name, tensor in teacher_before.state_dict().items():
        assert torch.equal(tensor, teacher_after.state_dict()[name])


def test_a_teacher_with_another_tokenizer_is_one_line(arithmetic_base, tmp_path, capsys):
    text = tmp_path / "letters.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 50, encoding="utf-8")
    other = [*TINY_GRID, "model.d_model=32", f"data.path={text}", f"out_dir={tmp_path}"]
    assert main(["train", "--quiet", *other, "train.max_steps=2", "name=other"]) == 0
    capsys.readouterr()
    out = [f"out_dir={tmp_path}", "name=student", "train.max_steps=2"]
    teacher = ["--teacher", str(tmp_path / "other")]
    assert main(["finetune", str(arithmetic_base), "--data", "addition2", *teacher, *out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: post.teacher={tmp_path / 'other'} has another tokenizer")
    assert "\n" not in err and not (tmp_path / "student").exists()
    dpo = ["--method", "dpo", "--teacher", str(arithmetic_base), *out]
    assert main(["finetune", str(arithmetic_base), "--data", "addition2", *dpo]) == 2
    assert "post.teacher distils into SFT" in capsys.readouterr().err

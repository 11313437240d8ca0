"""DPO: the loss is the paper's formula on completion-only sequence log-probs (sigmoid and IPO),
the reference is frozen (no gradient, not optimised, not saved), and `lmlab finetune --method
dpo` writes an ordinary run that logs reward margins and preference accuracy and learns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.config.schema import ModelConfig
from lmlab.model.lm import LanguageModel
from lmlab.posttrain.batches import pad_examples
from lmlab.posttrain.dpo import pair_statistics, preference_loss, sequence_logprobs
from lmlab.train.checkpoint import load_latest_checkpoint


def direct_logprob(logits: torch.Tensor, ids: list[int], prompt: int) -> float:
    """log p(completion | prompt) of one unpadded sequence, token by token."""
    total = 0.0
    for position in range(prompt, len(ids)):
        row = logits[position - 1].double()
        total += (row[ids[position]] - torch.logsumexp(row, 0)).item()
    return total


def test_sequence_logprobs_sum_completion_tokens_only():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2))
    sequences = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [3, 3, 4, 5]]
    prompts = [3, 1, 2]  # tokens of each prompt
    trained = [np.arange(len(s)) >= p for s, p in zip(sequences, prompts, strict=True)]
    batch = pad_examples([np.array(s) for s in sequences], trained)
    logits, _ = model(batch.inputs)
    got = sequence_logprobs(logits, batch.labels)
    for row, (ids, prompt) in enumerate(zip(sequences, prompts, strict=True)):
        alone, _ = model(torch.tensor([ids[:-1]]))  # no padding at all
        assert got[row].item() == pytest.approx(direct_logprob(alone[0], ids, prompt), abs=1e-4)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_preference_loss_is_the_papers_formula(kind):
    generator = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-10 * torch.rand(6, generator=generator, dtype=torch.float64) for _ in "1234")
    beta = 0.3
    got = preference_loss(pc, pr, rc, rr, beta, kind)
    for i in range(6):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        if kind == "sigmoid":  # Rafailov et al. 2023, eq. 7
            expected = -math.log(1 / (1 + math.exp(-beta * h)))
        else:  # Azar et al. 2023 (IPO)
            expected = (h - 1 / (2 * beta)) ** 2
        assert got[i].item() == pytest.approx(expected, rel=1e-12)


def test_pair_statistics_rewards_margins_and_accuracies():
    policy = torch.tensor([-1.0, -5.0, -2.0, -3.0])  # chosen 0, 1; rejected 0, 1
    reference = torch.tensor([-2.0, -4.0, -2.0, -2.0])
    stats = pair_statistics(policy, reference, beta=0.5)
    torch.testing.assert_close(stats["reward_chosen"], torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(stats["reward_rejected"], torch.tensor([0.0, -0.5]))
    torch.testing.assert_close(stats["reward_margin"], torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(stats["reward_accuracy"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(stats["preference_accuracy"], torch.tensor([1.0, 0.0]))


def test_dpo_run_learns_with_a_frozen_reference(arithmetic_base, tmp_path):
    from lmlab.posttrain.launch import start_run
    from lmlab.train.launch import parent_config

    settings = [
        f"train.init_from={arithmetic_base}",
        "post.method=dpo",
        "post.data=addition2",
        "train.max_steps=20",
        "train.eval_interval=20",
        "train.lr=3e-3",
        "train.warmup_steps=2",
        f"out_dir={tmp_path}",
        "name=dpo",
    ]
    trainer = start_run(parent_config(None, settings), "dpo", show_progress=False)
    reference = trainer.task.reference
    parent_weights = {k: v.clone() for k, v in reference.state_dict().items()}
    optimised = {
        id(p)
        for o in trainer.optimizers.optimizers.values()
        for g in o.param_groups
        for p in g["params"]
    }
    assert not any(id(p) in optimised for p in reference.parameters())
    assert not any(p.requires_grad for p in reference.parameters())
    before = trainer.evaluate()
    assert before["reward_accuracy"] == 0.0 and before["reward_margin"] == 0.0  # policy == ref
    trainer.train()
    for name, tensor in reference.state_dict().items():  # the reference never moved
        assert torch.equal(tensor, parent_weights[name])
    run = tmp_path / "dpo"
    checkpoint = load_latest_checkpoint(run)
    assert set(checkpoint.model) == set(trainer.model.state_dict())  # no reference inside
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert set(train[0]["task"]) == {
        "reward_chosen",
        "reward_rejected",
        "reward_margin",
        "reward_accuracy",
        "preference_accuracy",
    }
    assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:5]])
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # h = 0 at the start
    evaluation = next(r for r in rows if r["kind"] == "eval")
    assert evaluation["reward_margin"] > 0 and evaluation["reward_accuracy"] > 0.5
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_preference_accuracy"] == evaluation["preference_accuracy"]


def test_dpo_refuses_instruction_examples_and_unknown_loss(arithmetic_base, tmp_path, capsys):
    out = [f"out_dir={tmp_path}", "name=bad", "train.max_steps=2"]
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    assert (
        main(["finetune", str(arithmetic_base), "--method", "dpo", "--data", str(data), *out]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {data}:1: expected {{prompt, chosen, rejected}}")
    assert not (tmp_path / "bad").exists()
    loss = ["post.dpo_loss=hinge", *out]
    assert (
        main(["finetune", str(arithmetic_base), "--method", "dpo", "--data", "addition2", *loss])
        == 2
    )
    assert "post.dpo_loss" in capsys.readouterr().err
    assert not Path(tmp_path / "bad").exists()

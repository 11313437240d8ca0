"""GRPO: group-relative advantages and the clipped objective (with the k3 KL) against direct
computations, and a run that samples rollouts with the cached decode path, rewards them with a
registered verifier, logs rewards and learns a trivially learnable reward."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.posttrain.grpo import ADVANTAGE_EPS, clipped_objective, group_advantages
from lmlab.posttrain.verifiers import VERIFIERS, register_verifier


def test_group_advantages_are_relative_to_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 1.0])
    got = group_advantages(rewards, 4)
    for start in range(0, 12, 4):
        group = rewards[start : start + 4].tolist()
        mean, std = statistics.mean(group), statistics.stdev(group)
        for offset, reward in enumerate(group):
            expected = (reward - mean) / (std + ADVANTAGE_EPS)
            assert got[start + offset].item() == pytest.approx(expected, abs=1e-6)
    assert torch.all(got[4:8] == 0)  # a group that all agree teaches nothing


@pytest.mark.parametrize("kl", [0.0, 0.3])
def test_clipped_objective_is_the_papers_formula(kl):
    generator = torch.Generator().manual_seed(0)
    n, t, clip = 4, 5, 0.2
    logprobs = -torch.rand(n, t, generator=generator, dtype=torch.float64)
    old = logprobs + 0.5 * (torch.rand(n, t, generator=generator, dtype=torch.float64) - 0.5)
    reference = logprobs - 0.3 * torch.rand(n, t, generator=generator, dtype=torch.float64)
    advantages = torch.tensor([1.5, -0.7, 0.2, -1.0], dtype=torch.float64)
    mask = torch.tensor(
        [[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 0]]
    ).double()
    loss, mean_kl = clipped_objective(logprobs, old, advantages, mask, clip, reference, kl)
    total, kls, clipped = 0.0, 0.0, 0
    for i in range(n):
        tokens = [j for j in range(t) if mask[i, j]]
        row, row_kl = 0.0, 0.0
        for j in tokens:
            ratio = math.exp(logprobs[i, j].item() - old[i, j].item())
            a = advantages[i].item()
            bounded = min(max(ratio, 1 - clip), 1 + clip)
            clipped += bounded != ratio
            delta = reference[i, j].item() - logprobs[i, j].item()
            k3 = math.exp(delta) - delta - 1
            row += min(ratio * a, bounded * a) - kl * k3
            row_kl += k3
        total += row / len(tokens)
        kls += row_kl / len(tokens)
    assert clipped > 0, "the test must exercise the clip"
    assert loss.item() == pytest.approx(-total / n, rel=1e-12)
    assert mean_kl.item() == pytest.approx(kls / n, rel=1e-12)


def test_at_ratio_one_the_gradient_is_the_advantage_weighted_policy_gradient():
    logprobs = torch.tensor([[-0.5, -1.0], [-2.0, -0.1]], requires_grad=True)
    mask = torch.ones(2, 2)
    advantages = torch.tensor([1.0, -2.0])
    loss, _ = clipped_objective(logprobs, logprobs.detach(), advantages, mask, 0.2)
    loss.backward()
    expected = -advantages.unsqueeze(1).expand(2, 2) / 2 / 2  # tokens per row, rows
    torch.testing.assert_close(logprobs.grad, expected)


@pytest.fixture
def first_is_one(tmp_path):
    """A reward any model can learn: 1 when the completion starts with '1'."""
    register_verifier("first_is_one")(lambda completion, answer: float(completion[:1] == "1"))
    data = tmp_path / "ones.jsonl"
    prompts = [f"{a}+{b}=" for a in range(10, 40) for b in range(10, 12)]
    data.write_text(
        "".join(
            json.dumps({"prompt": p, "answer": "1", "verifier": "first_is_one"}) + "\n"
            for p in prompts
        )
    )
    yield data
    del VERIFIERS["first_is_one"]


def test_grpo_run_logs_rewards_and_learns_a_trivial_reward(arithmetic_base, first_is_one, tmp_path):
    settings = [
        "train.max_steps=25",
        "train.eval_interval=25",
        "train.lr=1e-2",
        "train.batch_size=4",
        "train.warmup_steps=1",
        "post.grpo_group=8",
        "post.max_new_tokens=3",
        "post.eval_examples=8",
        "post.grpo_kl=0.05",
        f"out_dir={tmp_path}",
        "name=grpo",
    ]
    command = ["finetune", str(arithmetic_base), "--method", "grpo", "--data", str(first_is_one)]
    assert main([*command, "--quiet", *settings]) == 0
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").open()]
    train = [r for r in rows if r["kind"] == "train"]
    assert set(train[0]["task"]) >= {"reward", "accuracy", "kl", "generate_s", "rollout_tokens"}
    assert train[0]["task"]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    assert train[-1]["task"]["kl"] > 0
    rewards = [r["task"]["reward"] for r in train]
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.3
    evaluation = next(r for r in rows if r["kind"] == "eval")
    assert 0.0 <= evaluation["accuracy"] <= 1.0
    summary = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    assert summary["val_accuracy"] == evaluation["accuracy"]


def test_digit_match_gives_partial_credit_and_one_only_for_the_answer():
    from lmlab.posttrain.verifiers import get_verifier

    digit_match = get_verifier("digit_match")
    assert digit_match("46\nmore", "46") == 1.0
    assert digit_match("47\n", "46") == 0.5
    assert digit_match("146\n", "46") == 0.0  # shifted: no digit in place
    assert digit_match("4\n", "46") == 0.5
    assert digit_match("", "46") == 0.0


def test_a_prompt_without_room_for_the_rollout_is_one_line(arithmetic_base, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2", "verifier": "exact_match"}\n' * 2)
    out = [f"out_dir={tmp_path}", "name=long", "train.max_steps=1", "post.max_new_tokens=22"]
    command = ["finetune", str(arithmetic_base), "--method", "grpo", "--data", str(data)]
    assert main([*command, *out]) == 2  # data.seq_len=24: 4 + 22 > 25
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {data}:1: a prompt of 4 tokens leaves no room")
    assert not (tmp_path / "long").exists()

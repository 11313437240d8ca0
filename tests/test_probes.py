"""Synthetic probes: generators follow their definitions, a tiny attention model solves a tiny
MQAR, loss by position has one value per bucket, and the CLI reports bad input in one line."""

import json

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.config.load import build_config
from lmlab.errors import LmlabError
from lmlab.eval.probes import (
    IGNORE,
    SCREEN_EXAMPLES,
    ProbeTask,
    induction,
    loss_by_position,
    mqar,
    needle,
    selective_copy,
)
from lmlab.experiments import probe as probe_runner
from lmlab.experiments.probe import probe_model_config, run_probe, train_probe
from lmlab.model.lm import LanguageModel


def test_mqar_layout_matches_zoology():
    vocab, seq, pairs = 64, 32, 4
    x, y = mqar(vocab, seq, pairs, 500, seed=1)
    assert x.shape == y.shape == (500, seq)
    keys, values = x[:, 0 : 2 * pairs : 2], x[:, 1 : 2 * pairs : 2]
    assert ((keys >= 1) & (keys < vocab // 2)).all()
    assert ((values >= vocab // 2) & (values < vocab)).all()
    assert all(len(set(row.tolist())) == pairs for row in keys)
    assert all(len(set(row.tolist())) == pairs for row in values)
    assert (y[:, : 2 * pairs] == IGNORE).all()
    for i in range(50):
        scored = (y[i] != IGNORE).nonzero().flatten()
        assert len(scored) == pairs
        assert ((scored - 2 * pairs) % 2 == 0).all()
        assert sorted(x[i, scored].tolist()) == sorted(keys[i].tolist())
        lookup = dict(zip(keys[i].tolist(), values[i].tolist(), strict=True))
        assert [lookup[k] for k in x[i, scored].tolist()] == y[i, scored].tolist()


def test_mqar_gaps_follow_the_power_law():
    seq, pairs = 64, 1
    _, y = mqar(256, seq, pairs, 20000, seed=0, power_a=0.01)
    gaps = ((y != IGNORE).nonzero()[:, 1] - 2 * pairs) // 2
    space = (seq - 2 * pairs) // 2
    p = np.arange(1, space + 1, dtype=float) ** (0.01 - 1)
    p /= p.sum()
    observed = np.bincount(gaps.numpy(), minlength=space) / len(gaps)
    assert np.abs(observed - p).max() < 0.02
    assert observed[0] > 5 * observed[10]
    _, uniform = mqar(256, seq, pairs, 20000, seed=0, power_a=1.0)
    flat = np.bincount(((uniform != IGNORE).nonzero()[:, 1] - 2) // 2, minlength=space)
    assert flat.min() > 0.7 * flat.max()


def test_generators_are_deterministic_by_seed():
    for make in (
        lambda s: mqar(64, 32, 4, 20, seed=s),
        lambda s: induction(16, 20, 20, seed=s),
        lambda s: selective_copy(16, 20, 4, 20, seed=s),
        lambda s: needle(16, 20, 20, seed=s),
    ):
        a, b, c = make(3), make(3), make(4)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], c[0])


def test_induction_selective_copy_and_needle_targets():
    x, y = induction(16, 20, 100, seed=0)
    for row, target in zip(x, y, strict=True):
        triggers = (row == 0).nonzero().flatten().tolist()
        assert len(triggers) == 2 and triggers[1] == 19
        assert (target != IGNORE).sum() == 1 and target[-1] == row[triggers[0] + 1]

    x, y = selective_copy(16, 20, 4, 100, seed=0)
    for row, target in zip(x, y, strict=True):
        data = row[:16][row[:16] != 0]
        assert row[16] == 1 and target[16:].tolist() == data.tolist()
        assert (target[:16] == IGNORE).all() and row[17:].tolist() == data[:-1].tolist()

    x, y = needle(16, 20, 100, seed=0)
    for row, target in zip(x, y, strict=True):
        depth = (row == 0).nonzero().flatten().tolist()
        assert len(depth) == 1 and row[-2] == 1 and row[-1] == row[depth[0] + 1]
        assert target[-1] == row[depth[0] + 2] and (target[:-1] == IGNORE).all()


def test_tiny_attention_model_solves_tiny_mqar(tmp_path):
    torch.set_num_threads(1)
    config = build_config(
        "gpt-tiny",
        ["model.d_model=64", "model.n_layers=2", "model.n_heads=1", "model.mlp_hidden=128"],
    )
    task = ProbeTask("mqar", 32, vocab_size=64, items=4, num_examples=3000, test_examples=200)
    report = run_probe(config, task, epochs=8, lrs=[3e-3], out=tmp_path)
    assert report["scores"]["mqar_s32_kv4"] >= 0.99
    assert report["sweep"][0]["solved"] and report["sweep"][0]["epochs"] < 8
    assert json.loads((tmp_path / "probes.json").read_text()) == report["scores"]
    assert "| 0.003 |" in (tmp_path / "probe-mqar_s32_kv4.md").read_text()


def test_probe_stops_at_the_first_evaluation_that_solves(monkeypatch):
    config = build_config("gpt-tiny", ["model.d_model=16", "model.n_layers=1", "model.n_heads=1"])
    task = ProbeTask("mqar", 16, vocab_size=16, items=2, num_examples=64, test_examples=200)
    model_cfg = probe_model_config(config, task)
    train, tests = task.generate(64, 0), task.test_sets()
    sizes = []  # examples scored per accuracy call: the 128-example screen or the full 200

    def fake_accuracy(scores):
        screens, fulls = iter(scores[0]), iter(scores[1])

        def accuracy(model, split):
            sizes.append(len(split[0]))
            return next(screens) if len(split[0]) == SCREEN_EXAMPLES else next(fulls)

        return accuracy

    # 64 examples in batches of 8: 8 steps per epoch, a check every 2 steps. Step 2's screen
    # fails; step 4's passes (>= 0.97) but the full set does not solve; step 6's full set does.
    monkeypatch.setattr(
        probe_runner, "accuracy", fake_accuracy(([0.5, 0.98, 0.99], [0.985, 0.995]))
    )
    result = train_probe(
        model_cfg, train, tests, lr=1e-3, epochs=5, batch_size=8, evals_per_epoch=4
    )
    assert result["solved"] and result["steps"] == 6 and result["epochs"] == 0.75
    assert result["accuracy"] == {"mqar_s16_kv2": 0.995}
    assert sizes == [128, 128, 200, 128, 200]

    # Never solved: screens only within an epoch, a full evaluation at the end of each.
    sizes.clear()
    monkeypatch.setattr(probe_runner, "accuracy", fake_accuracy(([0.5] * 6, [0.5, 0.6])))
    result = train_probe(
        model_cfg, train, tests, lr=1e-3, epochs=2, batch_size=8, evals_per_epoch=4
    )
    assert not result["solved"] and result["steps"] == 16 and result["epochs"] == 2
    assert result["accuracy"] == {"mqar_s16_kv2": 0.6} and sizes.count(200) == 2
    for bad, match in [
        ({"evals_per_epoch": 0}, "^evals_per_epoch=0 must be at least 1$"),
        ({"batch_size": 0}, "^batch_size=0 must be at least 1$"),
        ({"warmup": 1.0}, r"^warmup=1\.0 must be a fraction"),
    ]:
        with pytest.raises(LmlabError, match=match):
            train_probe(model_cfg, train, tests, lr=1e-3, epochs=1, **bad)


def test_loss_by_position_has_one_value_per_bucket():
    config = build_config(
        "gpt-tiny", ["model.d_model=32", "model.n_layers=1", "model.vocab_size=50"]
    )
    model = LanguageModel(config.model)
    tokens = np.random.default_rng(0).integers(0, 50, size=2000)
    curves = loss_by_position(model, tokens, [16, 64], buckets=4, max_windows=8)
    assert list(curves) == [16, 64]
    assert all(len(c) == 4 for c in curves.values())
    assert all(abs(v - np.log(50)) < 0.5 for c in curves.values() for v in c)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["gpt-tiny", "--task", "sorting"], "unknown probe task 'sorting'"),
        (["gpt-tiny", "--task", "mqar", "--seq-len", "32", "--kv-pairs", "16"], "too short"),
        (["gpt-tiny", "--task", "mqar", "--lrs", "fast"], "--lrs"),
    ],
)
def test_cli_rejects_bad_probe_input(argv, message, capsys):
    code = main(["probe", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err


def test_probe_trains_with_the_shared_step_aux_loss_and_feature_check(monkeypatch):
    """The probe trainer runs the Trainer's step: an MoE's aux loss is part of every step, and
    a feature switched on that never runs stops the probe at its first step."""
    from lmlab.layers.features import FeatureCounter, feature_modules
    from lmlab.train.step import TrainStep

    config = build_config(
        "gpt-tiny",
        ["model.d_model=16", "model.n_layers=1", "model.n_heads=1", "model.channel_mixer=moe"],
    )
    task = ProbeTask("mqar", 16, vocab_size=16, items=2, num_examples=64, test_examples=64)
    model_cfg = probe_model_config(config, task)
    train, tests = task.generate(64, 0), task.test_sets()
    results = []
    original = TrainStep.__call__

    def recorded(self, *args):
        results.append(original(self, *args))
        return results[-1]

    monkeypatch.setattr(TrainStep, "__call__", recorded)
    outcome = train_probe(model_cfg, train, tests, lr=1e-3, epochs=1, batch_size=16)
    assert outcome["steps"] == len(results) == 4
    assert all(r.aux_loss > 0 and r.feature_calls == {"moe": 1} for r in results)

    class SilentFeature(FeatureCounter, torch.nn.Module):
        feature = "never_runs"

    original_init = LanguageModel.__init__

    def with_idle_feature(self, cfg):
        original_init(self, cfg)
        self.idle = SilentFeature()
        self._feature_modules = feature_modules(self)

    monkeypatch.setattr(LanguageModel, "__init__", with_idle_feature)
    with pytest.raises(LmlabError, match="never_runs switched on but never ran in step 1"):
        train_probe(model_cfg, train, tests, lr=1e-3, epochs=1, batch_size=16)


def test_probe_with_an_out_folder_is_recorded_in_the_run_registry(tmp_path, monkeypatch):
    from lmlab.train import registry

    monkeypatch.delenv(registry.REGISTRY_ENV, raising=False)
    config = build_config("gpt-tiny", ["model.d_model=16", "model.n_layers=1", "model.n_heads=1"])
    task = ProbeTask("mqar", 16, vocab_size=16, items=2, num_examples=32, test_examples=32)
    out = tmp_path / "runs" / "r"
    report = run_probe(config, task, epochs=1, lrs=[1e-3], batch_size=16, out=out)
    (row,) = registry.list_runs(tmp_path / "runs")[0]
    assert row["path"] == str((out / "probe-mqar_s16_kv2.md").resolve())
    assert row["arm"] == "probe:mqar_s16_kv2" and row["status"] == "finished"
    assert row["seconds"] == pytest.approx(report["sweep"][0]["seconds"])
    assert row["config_hash"] == registry.config_hash(config)

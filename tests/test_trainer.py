"""Trainer pieces: schedules, budgets, the curriculum, precision choice, truncated BPTT with
carried state, auxiliary losses and integrity counters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, ctrl_c_in_step, metrics_rows, train_losses

from lmlab.cli import main
from lmlab.config.load import build_config
from lmlab.errors import LmlabError
from lmlab.layers.features import FeatureCounter, feature_modules
from lmlab.train.device import resolve_precision
from lmlab.train.schedule import lr_multiplier
from lmlab.train.trainer import budget_for, seq_len_at


def test_cosine_and_wsd_schedules():
    assert lr_multiplier("cosine", 0, 0.0, 10, 0.1, 0.2) == pytest.approx(0.1)
    assert lr_multiplier("cosine", 9, 0.0, 10, 0.1, 0.2) == pytest.approx(1.0)
    assert lr_multiplier("cosine", 50, 0.5, 10, 0.1, 0.2) == pytest.approx(0.55)
    assert lr_multiplier("cosine", 100, 1.0, 10, 0.1, 0.2) == pytest.approx(0.1)
    assert lr_multiplier("wsd", 50, 0.7, 10, 0.0, 0.2) == pytest.approx(1.0)
    assert lr_multiplier("wsd", 90, 0.9, 10, 0.0, 0.2) == pytest.approx(0.5)
    assert lr_multiplier("constant", 90, 0.9, 10, 0.0, 0.2) == 1.0


def test_budgets_in_steps_tokens_and_time():
    config = build_config(None, ["train.max_tokens=10000", "data.seq_len=64", "train.batch_size=8"])
    assert budget_for(config).steps == 20  # ceil(10000 / 512)
    config = build_config(None, ["train.max_time=30"])
    budget = budget_for(config)
    assert budget.progress(5, 15.0) == 0.5 and budget.done(9, 30.0)


def test_sequence_length_curriculum():
    config = build_config(
        None, ["data.seq_len=256", "train.seq_len_start=64", "train.curriculum_steps=100"]
    )
    lengths = [seq_len_at(config, s) for s in range(0, 120, 10)]
    assert lengths[0] == 64 and lengths[-1] == 256
    assert lengths == sorted(lengths) and all(n % 8 == 0 for n in lengths)


def test_auto_precision_follows_the_hardware(monkeypatch):
    import lmlab.train.device as device

    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


TINY = [*TINY_RUN, "train.deterministic=true"]


def two_step_trainer(tmp_path, corpus, name: str, *extra: str):
    """A new trainer of the tiny model for two steps on the test corpus, run folder ``name``."""
    from lmlab.train.launch import new_trainer

    settings = [*TINY, f"data.path={corpus}", "data.seq_len=16", "train.max_steps=2", *extra]
    config = build_config(None, [*settings, f"out_dir={tmp_path}", f"name={name}"])
    return new_trainer(config, name, show_progress=False)


def test_tbptt_with_curriculum_resumes_exactly(tmp_path, corpus):

    settings = [
        *TINY,
        "model.mixer=gla",
        f"data.path={corpus}",
        "data.seq_len=32",
        "train.tbptt=true",
        "train.seq_len_start=8",
        "train.curriculum_steps=6",
        "train.max_steps=12",
        "train.checkpoint_interval=3",
        f"out_dir={tmp_path}",
    ]
    assert main(["train", "--quiet", *settings, "name=whole"]) == 0
    whole = metrics_rows(tmp_path / "whole")
    assert [r["seq_len"] for r in whole][:3] == [8, 8, 16]
    with ctrl_c_in_step(7):
        assert main(["train", "--quiet", *settings, "name=part"]) == 130
    assert main(["train", "--quiet", "--resume", str(tmp_path / "part")]) == 0
    part = metrics_rows(tmp_path / "part")
    assert [r["loss"] for r in part] == [r["loss"] for r in whole]


class SilentFeature(FeatureCounter, torch.nn.Module):
    feature = "never_runs"


def test_feature_switched_on_but_never_run_is_an_error(tmp_path, corpus, monkeypatch):
    from lmlab.model.lm import LanguageModel

    original_init = LanguageModel.__init__

    def with_idle_feature(self, cfg):
        original_init(self, cfg)
        self.idle = SilentFeature()
        self._feature_modules = feature_modules(self)  # the model collects them at construction

    monkeypatch.setattr(LanguageModel, "__init__", with_idle_feature)
    with pytest.raises(LmlabError, match="never_runs switched on but never ran in step 1"):
        two_step_trainer(tmp_path, corpus, "f").train()


def test_auxiliary_loss_is_added_but_logged_apart(tmp_path, corpus, monkeypatch):
    from lmlab.model.lm import LanguageModel

    monkeypatch.setattr(LanguageModel, "auxiliary_loss", lambda self: torch.tensor(0.25))
    two_step_trainer(tmp_path, corpus, "a").train()
    first = metrics_rows(tmp_path / "a")[0]
    assert first["aux_loss"] == 0.25 and first["loss"] > 1.0


def test_compiled_training_matches_eager(tmp_path, corpus):
    for name, compiled in (("eager", "false"), ("compiled", "true")):
        two_step_trainer(tmp_path, corpus, name, f"train.compile={compiled}").train()
    eager, compiled = (
        list(train_losses(tmp_path / name).values()) for name in ("eager", "compiled")
    )
    assert len(eager) == 2
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, corpus, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(LmlabError, match="needs the tensorboard package"):
        two_step_trainer(tmp_path, corpus, "tb", "train.tensorboard=true")


def test_tbptt_refuses_an_attention_cache_without_a_window(tmp_path, corpus, capsys):
    settings = [*TINY, f"data.path={corpus}", "train.tbptt=true", f"out_dir={tmp_path}"]
    assert main(["train", "--quiet", *settings, "name=unbounded"]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: train.tbptt carries the state of blocks.0.mixer (attention)")
    assert "window" in message
    assert not (tmp_path / "unbounded").exists()
    windowed = [*settings, "model.mixer_options.attention.window=16", "name=windowed"]
    assert main(["train", "--quiet", *windowed]) == 0


def test_tbptt_refuses_hyena_whose_state_keeps_every_past_input(tmp_path, corpus):
    with pytest.raises(LmlabError) as refused:
        two_step_trainer(tmp_path, corpus, "hyena", "model.mixer=hyena", "train.tbptt=true")
    message = str(refused.value)
    assert message.startswith("train.tbptt carries the state of blocks.0.mixer (hyena), ")
    assert "blocks.1.mixer (hyena)" in message and "train.tbptt=false" in message


def test_training_end_writes_the_moe_specialisation_table(tmp_path, corpus):
    trainer = two_step_trainer(
        tmp_path, corpus, "moe", "model.channel_mixer=moe", "model.mixer_options.moe.n_experts=4"
    )
    trainer.train()
    table = json.loads((trainer.run_dir / "expert_specialisation.json").read_text())["layers"]
    assert set(table) == {"blocks.0.channel", "blocks.1.channel"}
    rows = table["blocks.0.channel"]["rows"]
    assert sum(row["total"] for row in rows) == 2 * 4 * 16 * 2  # steps, rows, tokens, top_k


MOE = ["model.channel_mixer=moe", "model.mixer_options.moe.n_experts=4"]
NO_AUX = ["model.mixer_options.moe.aux_loss_coef=0", "model.mixer_options.moe.z_loss_coef=0"]


def test_moe_auxiliary_loss_reaches_the_backward_pass(tmp_path, corpus):
    """The coefficients change only the loss, not the forward pass: the first step's loss is
    the same to the bit, and only the gradients show whether the aux loss was backpropagated."""
    with_aux = two_step_trainer(tmp_path, corpus, "aux", *MOE)
    with_aux.train()
    two_step_trainer(tmp_path, corpus, "none", *MOE, *NO_AUX).train()
    first, plain = metrics_rows(tmp_path / "aux")[0], metrics_rows(tmp_path / "none")[0]
    assert first["loss"] == plain["loss"]
    assert first["aux_loss"] > 0 and plain["aux_loss"] == 0.0
    assert first["grad_norm"] != plain["grad_norm"]
    assert first["grad_norm_layers"] != plain["grad_norm_layers"]


def test_shared_step_backpropagates_loss_plus_aux_loss():
    """With plain SGD at rate 1 and no clipping, a step moves every weight by minus its
    gradient, so the update is compared with the gradient of loss + aux computed directly."""
    import copy

    import torch.nn.functional as F

    from lmlab.config.schema import ModelConfig
    from lmlab.model.lm import LanguageModel
    from lmlab.train.optim import OptimizerSet
    from lmlab.train.step import TrainStep

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, channel_mixer="moe")
    model = LanguageModel(cfg)
    reference, without_aux = copy.deepcopy(model), copy.deepcopy(model)
    x, y = torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8))

    def loss(model):
        return lambda batch: F.cross_entropy(model(batch[0])[0].flatten(0, 1), batch[1].flatten())

    logits_loss = loss(reference)((x, y))
    aux = reference.auxiliary_loss()
    (logits_loss + aux).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sgd = OptimizerSet({"sgd": torch.optim.SGD(model.parameters(), lr=1.0)})
    result = TrainStep(model, sgd, grad_clip=0)(1, 1.0, lambda _: (x, y), loss(model))
    assert result.loss == pytest.approx(logits_loss.item(), rel=1e-6)
    assert result.aux_loss == pytest.approx(aux.item(), rel=1e-6) and result.aux_loss > 0
    assert result.feature_calls == {"moe": 1}
    for name, param in reference.named_parameters():
        moved = before[name] - dict(model.named_parameters())[name].detach()
        torch.testing.assert_close(moved, param.grad, rtol=1e-5, atol=1e-7, msg=name)
    loss(without_aux)((x, y)).backward()
    routers = [n for n, _ in reference.named_parameters() if "router" in n]
    grads = dict(without_aux.named_parameters())
    assert routers and all(
        not torch.allclose(p.grad, grads[n].grad)
        for n, p in reference.named_parameters()
        if n in routers
    )


def test_torch_settings_apply_while_training_and_are_restored(tmp_path, corpus):
    threads = torch.get_num_threads()
    seen = []

    def note(result):
        seen.append((torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()))

    trainer = two_step_trainer(tmp_path, corpus, "s", f"train.threads={threads + 1}")
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    trainer.eval_listeners.append(note)
    trainer.train()
    assert seen == [(threads + 1, True)]
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()

    def fail(result):
        raise RuntimeError("listener failed")

    trainer = two_step_trainer(tmp_path, corpus, "f", f"train.threads={threads + 1}")
    trainer.eval_listeners.append(fail)
    with pytest.raises(RuntimeError, match="listener failed"):
        trainer.train()
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()


def test_sigint_stops_after_the_step_saves_it_and_resumes_exactly(tmp_path, corpus, monkeypatch):
    """A SIGINT that arrives inside step 5 only sets a flag: step 5 completes, is saved (not
    a checkpoint interval), the previous handler is back, and the registry says interrupted."""
    import signal

    from lmlab.train import registry
    from lmlab.train.checkpoint import load_latest_checkpoint

    monkeypatch.delenv(registry.REGISTRY_ENV, raising=False)
    settings = [
        *TINY,
        f"data.path={corpus}",
        "data.seq_len=16",
        "train.optimizer=muon",
        "train.max_steps=8",
        "train.checkpoint_interval=100",
        f"out_dir={tmp_path}",
    ]
    assert main(["train", "--quiet", *settings, "name=whole"]) == 0
    before = signal.getsignal(signal.SIGINT)  # ignored when the suite runs as a background job
    with ctrl_c_in_step(5):
        assert main(["train", "--quiet", *settings, "name=part"]) == 130
    assert signal.getsignal(signal.SIGINT) is before
    assert load_latest_checkpoint(tmp_path / "part").step == 5
    status = {Path(r["path"]).name: r["status"] for r in registry.list_runs(tmp_path)[0]}
    assert status == {"whole": "finished", "part": "interrupted"}
    assert main(["train", "--quiet", "--resume", str(tmp_path / "part")]) == 0
    part = list(train_losses(tmp_path / "part").values())
    assert part == list(train_losses(tmp_path / "whole").values())
    status = {Path(r["path"]).name: r["status"] for r in registry.list_runs(tmp_path)[0]}
    assert status == {"whole": "finished", "part": "finished"}


def test_cuda_runs_matmuls_in_tf32_while_training_unless_deterministic():
    """Only the process-wide precision setting is involved, so no GPU is needed."""
    from lmlab.config.schema import TrainConfig
    from lmlab.train.trainer import torch_settings

    before = torch.get_float32_matmul_precision()
    with torch_settings(TrainConfig(), torch.device("cuda")):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before
    for train, device in ((TrainConfig(), "cpu"), (TrainConfig(deterministic=True), "cuda")):
        with torch_settings(train, torch.device(device)):
            assert torch.get_float32_matmul_precision() == before == "highest"

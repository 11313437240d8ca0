"""End-to-end through the ``lmlab`` command: train, resume (also after SIGKILL), eval,
generate, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ctrl_c_in_step, expect_one_error, metrics_rows, tiny_run_args, train_losses

from lmlab.cli import build_parser, main, parse_args


def train_args(tmp_path: Path, corpus: Path, name: str, *extra: str) -> list[str]:
    return tiny_run_args(corpus, tmp_path / "runs", name, *extra)


def test_train_eval_generate(tmp_path, corpus, capsys):
    assert (
        main(train_args(tmp_path, corpus, "a", "train.max_steps=12", "train.eval_interval=5")) == 0
    )
    run = tmp_path / "runs" / "a"
    for item in ("config.yaml", "tokenizer", "metrics.jsonl", "summary.json", "checkpoints"):
        assert (run / item).exists(), item
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12
    train_rows = metrics_rows(run)
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    first = train_rows[0]
    assert len(first["grad_norm_layers"]) == 2
    assert set(first["time_ms"]) == {"data", "forward_backward", "optimizer"}
    assert first["tokens_per_s"] > 0 and first["peak_memory_mb"] > 0
    assert [r["step"] for r in metrics_rows(run, "eval")] == [5, 10, 12]
    capsys.readouterr()
    assert main(["eval", str(run), "--batches", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 12 and result["bits_per_byte"] > 0
    assert main(["generate", str(run), "--prompt", "Line", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out.startswith("Line")


def test_token_budget_sets_the_number_of_steps(tmp_path, corpus):
    assert main(train_args(tmp_path, corpus, "t", "train.max_tokens=1000")) == 0
    assert len(train_losses(tmp_path / "runs" / "t")) == 8  # ceil(1000 / (4 * 32))


def test_muon_and_wsd_train(tmp_path, corpus):
    args = train_args(
        tmp_path,
        corpus,
        "m",
        "train.max_steps=6",
        "train.optimizer=muon",
        "train.schedule=wsd",
        "train.grad_accum=2",
    )
    assert main(args) == 0
    values = train_losses(tmp_path / "runs" / "m")
    assert len(values) == 6 and all(v == v for v in values.values())


def test_interrupt_then_resume_continues_exactly(tmp_path, corpus):
    common = [
        "train.max_steps=16",
        "train.checkpoint_interval=4",
        "train.deterministic=true",
        "train.optimizer=muon",
    ]
    assert main(train_args(tmp_path, corpus, "whole", *common)) == 0
    with ctrl_c_in_step(11):
        assert main(train_args(tmp_path, corpus, "part", *common)) == 130
    part = tmp_path / "runs" / "part"
    assert len(train_losses(part)) == 11
    assert main(["train", "--quiet", "--resume", str(part)]) == 0
    assert train_losses(part) == train_losses(tmp_path / "runs" / "whole")


def test_resume_after_sigkill_matches_uninterrupted(tmp_path, corpus):
    common = ["train.max_steps=40", "train.checkpoint_interval=5", "train.deterministic=true"]
    assert main(train_args(tmp_path, corpus, "whole", *common)) == 0
    command = [sys.executable, "-m", "lmlab", *train_args(tmp_path, corpus, "killed", *common)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "runs" / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 17:
            break
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = len(train_losses(tmp_path / "runs" / "killed"))
    assert 10 < killed_at < 40, "the kill must land mid-run"
    assert main(["train", "--quiet", "--resume", str(tmp_path / "runs" / "killed")]) == 0
    assert train_losses(tmp_path / "runs" / "killed") == train_losses(tmp_path / "runs" / "whole")


def test_corrupt_newest_checkpoint_falls_back(tmp_path, corpus, capsys):
    args = train_args(tmp_path, corpus, "c", "train.max_steps=8", "train.checkpoint_interval=4")
    assert main(args) == 0
    run = tmp_path / "runs" / "c"
    newest = sorted((run / "checkpoints").iterdir())[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert main(["eval", str(run), "--batches", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 4
    assert len([line for line in captured.err.splitlines() if "corrupt" in line]) == 1


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    out = f"out_dir={tmp_path / 'runs'}"
    expect_one_error(capsys, ["train", "data.path=/nonexistent/x.txt", out], "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    expect_one_error(capsys, ["train", f"data.path={empty}", out], "empty")
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 au lait".encode("latin-1") * 100)
    expect_one_error(capsys, ["train", f"data.path={binary}", out], "UTF-8")
    expect_one_error(capsys, ["train", "--preset", "nope", out], "unknown preset")
    expect_one_error(
        capsys, ["train", "model.d_model=100", "model.n_heads=3", out], "not divisible"
    )
    expect_one_error(capsys, ["train", "train.lr=-0.1", out], "must be positive")
    expect_one_error(capsys, ["train", "model.widht=3", out], "unknown config key")
    expect_one_error(capsys, ["eval", str(tmp_path)], "not an lmlab run")
    expect_one_error(capsys, ["generate", str(tmp_path / "missing")], "does not exist")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_resume_rejects_incompatible_changes(tmp_path, corpus, capsys):
    assert main(train_args(tmp_path, corpus, "r", "train.max_steps=2")) == 0
    run = tmp_path / "runs" / "r"
    before = (run / "config.yaml").read_text()
    expect_one_error(capsys, ["train", "--resume", str(run), "model.d_model=64"], "cannot change")
    assert (run / "config.yaml").read_text() == before
    expect_one_error(
        capsys,
        ["train", str(run / "config.yaml"), f"out_dir={tmp_path / 'runs'}", "name=r"],
        "already exists",
    )


@pytest.mark.parametrize(
    ("argv", "configs", "overrides"),
    [
        (["train", "--quiet", "a.yaml", "train.lr=1e-3"], ["a.yaml"], ["train.lr=1e-3"]),
        (
            ["train", "train.lr=1e-3", "--quiet", "a.yaml", "--preset", "p", "model.d_model=64"],
            ["a.yaml"],
            ["train.lr=1e-3", "model.d_model=64"],
        ),
        (["info", "model.d_model=64", "gpt-tiny", "train.lr=1"], ["gpt-tiny"], None),
        (
            ["compare", "a", "--budget", "tokens=1k", "b", "--seeds", "2", "model.d_model=64"],
            ["a", "b"],
            ["model.d_model=64"],
        ),
        (
            ["probe", "gpt-tiny", "--task", "mqar", "model.mixer=gla", "--seed", "1", "x.y=2"],
            ["gpt-tiny"],
            ["model.mixer=gla", "x.y=2"],
        ),
    ],
)
def test_configs_and_overrides_may_follow_options(argv, configs, overrides):
    args = parse_args(build_parser(), argv)
    assert args.configs == configs
    assert args.overrides == (overrides or ["model.d_model=64", "train.lr=1"])


def test_a_yaml_file_whose_name_holds_equals_is_a_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("d_model=16.yaml").write_text("model: {d_model: 16}\n")
    args = parse_args(build_parser(), ["info", "d_model=16.yaml", "model.n_layers=1"])
    assert (args.configs, args.overrides) == (["d_model=16.yaml"], ["model.n_layers=1"])


def test_unknown_options_and_stray_arguments_are_still_rejected(capsys):
    for argv in (["probe", "gpt-tiny", "--task", "mqar", "--bogus", "1"], ["eval", "run", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(build_parser(), argv)
        assert exit_info.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


def test_overrides_after_options_reach_each_command(tmp_path, capsys):
    """On gpt-tiny (d_model 192, 4 heads) d_model=100 alone and n_heads=3 alone are valid and
    together not, so each error proves that the override after an option was read."""
    pair = ["model.d_model=100", "--quiet", "model.n_heads=3"]
    expect_one_error(capsys, ["train", *pair, f"out_dir={tmp_path / 'runs'}"], "not divisible")
    expect_one_error(capsys, ["info", "model.d_model=100", "model.n_heads=3"], "not divisible")
    probe = ["probe", "gpt-tiny", "model.d_model=100", "--task", "mqar", "model.n_heads=3"]
    expect_one_error(capsys, probe, "not divisible")
    compare = ["compare", "gpt-tiny", "--variant", "train.lr=1e-2", "--budget", "tokens=4k", *pair]
    expect_one_error(capsys, compare, "not divisible")
    expect_one_error(capsys, ["probe", "--task", "mqar"], "give a config")
    expect_one_error(capsys, ["info", "gpt-tiny", "other"], "unexpected argument 'other'")


def test_serve_takes_speculative_decodings_defaults():
    """``lmlab serve`` and ``lmlab generate`` declare --draft-tokens and --draft-confidence once,
    with stream_speculative's defaults: serve's own signature must agree with them."""
    import inspect

    from lmlab.model.speculative import stream_speculative
    from lmlab.serve.server import serve

    for name in ("draft_tokens", "draft_confidence"):
        expected = inspect.signature(stream_speculative).parameters[name].default
        assert inspect.signature(serve).parameters[name].default == expected

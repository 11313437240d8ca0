"""Bad command-line input on every verb: exit code 2, one ``error:`` line, no traceback and
nothing written; ``lmlab info`` quotes the parameter count a run really has and lists every
registered mixer."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmlab.cli import COMMANDS, main
from lmlab.errors import ParamError
from lmlab.layers.registry import CHANNEL_MIXERS, TOKEN_MIXERS, import_builtin_layers
from lmlab.train.run import load_trained_model

TINY = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "data.seq_len=32",
    "train.batch_size=4",
    "train.max_steps=2",
    "train.max_time=0",
    "train.eval_batches=1",
    "train.warmup_steps=1",
    "train.threads=1",
]
ARMS = ["gpt-tiny", "--variant", "model.d_model=32", "--budget", "tokens=4k"]
SCALE = ["gpt-tiny", "--sizes", "d_model=32,48", "--tokens", "2k,4k"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny trained run (char tokenizer on the embedded corpus) shared by the cases."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "--quiet", *TINY, f"out_dir={out}", "name=tiny"]) == 0
    return out / "tiny"


CASES = [
    ["train", "--resume"],
    ["train", "--bogus"],
    ["train", "model.widht=3"],
    ["train", "--preset", "gpt-tiny", "train.lr=nan"],
    ["eval", "RUN", "--batches", "0"],
    ["eval", "RUN", "--seq-len", "-5"],
    ["eval", "RUN", "--split", "test"],
    ["eval", "RUN", "--batches", "many"],
    ["generate", "RUN", "--temperature", "nan"],
    ["generate", "RUN", "--temperature", "inf"],
    ["generate", "RUN", "--temperature", "-1"],
    ["generate", "RUN", "--top-p", "-0.5"],
    ["generate", "RUN", "--top-p", "inf"],
    ["generate", "RUN", "--top-p", "nan"],
    ["generate", "RUN", "--top-k", "-1"],
    ["generate", "RUN", "--min-p", "nan"],
    ["generate", "RUN", "--max-new-tokens", "-1"],
    ["generate", "RUN", "--seed", "-1"],
    ["generate", "RUN", "--prompt", ""],
    ["export", "RUN"],
    ["export", "RUN", "--format", "zip", "--out", "model.safetensors"],
    ["export", "RUN", "--out", "model.safetensors"],
    ["presets", "extra"],
    ["info", "nope"],
    ["info", "gpt-tiny", "model.d_model=-1"],
    ["info", "gpt-tiny", "other"],
    ["compare", *ARMS, "--seeds", "-1"],
    ["compare", *ARMS, "--seeds", "0"],
    ["compare", *ARMS, "--parallel", "-2"],
    ["compare", *ARMS, "--target-loss", "nan"],
    ["compare", *ARMS, "--baseline", "nobody"],
    ["compare", "gpt-tiny", "--variant", "model.d_model=32"],
    ["compare", "gpt-tiny", "--variant", "model.d_model=32", "--budget", "tokens=-5"],
    ["scale", *SCALE, "--seeds", "-1"],
    ["scale", "gpt-tiny", "--sizes", "d_model", "--tokens", "2k,4k"],
    ["scale", "gpt-tiny", "--sizes", "d_model=32,48"],
    ["scale", *SCALE, "--holdout", "d_model=64"],
    ["search", "missing.yaml", "--budget", "tokens=4k"],
    ["search", "SPACE", "--budget", "tokens=4k", "--trials", "0"],
    ["search", "SPACE", "--budget", "tokens=4k", "--seed", "-1"],
    ["search", "SPACE"],
    ["runs", "RUNS", "--filter", "colour=red"],
    ["runs", "RUNS", "--filter", "no-equals"],
    ["probe", "gpt-tiny", "--examples", "0"],
    ["probe", "gpt-tiny", "--seq-len", "0"],
    ["probe", "gpt-tiny", "--kv-pairs", "0"],
    ["probe", "gpt-tiny", "--vocab", "4"],
    ["probe", "gpt-tiny", "--epochs", "0"],
    ["probe", "gpt-tiny", "--batch-size", "0"],
    ["probe", "gpt-tiny", "--warmup", "nan"],
    ["probe", "gpt-tiny", "--evals-per-epoch", "-1"],
    ["probe", "gpt-tiny", "--lrs", "nan"],
    ["probe", "gpt-tiny", "--lrs", "fast"],
    ["probe", "gpt-tiny", "--seed", "-1"],
    ["probe", "gpt-tiny", "--task", "sorting"],
    ["probe", "RUN", "--task", "loss_by_position", "--buckets", "0"],
    ["probe", "RUN", "--task", "loss_by_position", "--buckets", "-3"],
    ["probe", "--task", "mqar"],
    ["finetune", "RUN"],
    ["finetune", "nowhere", "--data", "addition2"],
    ["finetune", "RUN", "--data", "missing.jsonl"],
    ["finetune", "RUN", "--data", "BAD"],
    ["finetune", "RUN", "--data", "addition2", "--method", "rlhf"],
    ["finetune", "RUN", "--data", "addition2", "post.overlong=cut"],
    ["finetune", "RUN", "--data", "addition2", "post.lora_rank=0"],
    ["finetune", "RUN", "--data", "addition2", "model.d_model=48"],
    ["finetune", "RUN", "--data", "addition2", "gpt-tiny"],
    ["finetune", "RUN", "--data", "BAD", "--method", "dpo"],
    ["finetune", "RUN", "--data", "addition2", "--method", "dpo", "post.dpo_beta=0"],
    ["finetune", "RUN", "--data", "addition2", "--method", "dpo", "post.dpo_beta=-1"],
    ["finetune", "RUN", "--data", "addition2", "--method", "dpo", "post.dpo_loss=hinge"],
    ["finetune", "RUN", "--data", "addition2", "--teacher", "nowhere"],
    ["finetune", "RUN", "--data", "addition2", "--teacher", "RUN", "post.distill_alpha=1.5"],
    ["finetune", "RUN", "--data", "addition2", "--teacher", "RUN", "post.distill_temperature=0"],
    ["finetune", "RUN", "--data", "addition2", "--teacher"],
    ["finetune", "RUN", "--data", "addition2", "--method", "grpo", "post.grpo_group=1"],
    ["finetune", "RUN", "--data", "addition2", "--method", "grpo", "post.grpo_clip=0"],
    ["finetune", "RUN", "--data", "addition2", "--method", "grpo", "post.grpo_kl=-1"],
    ["finetune", "RUN", "--data", "addition2", "--method", "grpo", "post.rollout_temperature=0"],
    ["finetune", "RUN", "--data", "BAD", "--method", "grpo"],
    ["train", "train.init_from=RUN@99"],
    ["train", "train.init_from=nowhere"],
    ["merge", "RUN"],
    ["merge", "nowhere"],
]


def files_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_the_cases_cover_every_verb():
    assert {case[0] for case in CASES} == {command.name for command in COMMANDS}


@pytest.mark.parametrize("argv", CASES, ids=" ".join)
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(
    argv, run, tmp_path, monkeypatch, capsys
):
    work = tmp_path / "work"
    work.mkdir()
    (work / "SPACE.yaml").write_text("base: gpt-tiny\nparams:\n  train.lr: [0.001, 0.01]\n")
    (work / "bad.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": 1}\n')
    monkeypatch.chdir(work)
    monkeypatch.setenv("LMLAB_REGISTRY", str(work / "registry.sqlite"))
    paths = {"RUN": str(run), "RUNS": str(run.parent), "SPACE": "SPACE.yaml", "BAD": "bad.jsonl"}
    argv = [paths.get(arg, arg).replace("RUN@", f"{run}@") for arg in argv]
    before_cwd, before_run = files_under(work), files_under(run.parent)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert files_under(work) == before_cwd
    assert files_under(run.parent) == before_run


def test_library_errors_name_parameters_and_the_cli_names_flags(run, capsys):
    from lmlab.experiments.compare import plan_compare

    with pytest.raises(ParamError, match=r"^seeds=0 must be at least 1"):
        plan_compare(["gpt-tiny", "gpt-tiny"], budget="tokens=4k", seeds=0)
    assert main(["probe", str(run), "--task", "loss_by_position", "--buckets", "40"]) == 2
    assert "shorter than --buckets=40" in capsys.readouterr().err


def test_info_quotes_the_parameters_of_the_trained_run(run, capsys):
    _, model, tokenizer, _ = load_trained_model(run)
    assert tokenizer.kind == "char"
    capsys.readouterr()
    assert main(["info", "gpt-tiny", *TINY]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {model.num_parameters():,} (" in out
    assert f"vocabulary: {tokenizer.vocab_size} (char tokenizer" in out


def test_info_mixers_lists_every_registered_mixer(capsys):
    assert main(["info", "--mixers"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line[:2] == "  "}
    import_builtin_layers()
    assert listed == set(TOKEN_MIXERS) | set(CHANNEL_MIXERS)

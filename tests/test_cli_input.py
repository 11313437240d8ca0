"""Bad command-line input on every verb: exit code 2, one ``error:`` line, no traceback and
nothing written; ``lmlab info`` quotes the parameter count a run really has and lists every
registered mixer."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TINY_RUN

from lmlab.cli import COMMANDS, main
from lmlab.errors import ParamError
from lmlab.layers.registry import CHANNEL_MIXERS, TOKEN_MIXERS, import_builtin_layers
from lmlab.memory.store import build_store
from lmlab.train.run import load_trained_model

TINY = [*TINY_RUN, "model.n_layers=1", "train.max_steps=2", "train.eval_batches=1"]
ARMS = ["gpt-tiny", "--variant", "model.d_model=32", "--budget", "tokens=4k"]
SCALE = ["gpt-tiny", "--sizes", "d_model=32,48", "--tokens", "2k,4k"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny trained run (char tokenizer on the embedded corpus) shared by the cases."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "--quiet", *TINY, f"out_dir={out}", "name=tiny"]) == 0
    return out / "tiny"


@pytest.fixture(scope="module")
def stores(run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A small retrieval store of ``run`` and damaged or foreign copies of it, by name."""
    root = tmp_path_factory.mktemp("stores")
    good = root / "store"
    build_store(run, good, max_tokens=600, show_progress=False)

    def variant(name: str, change: Callable[[Path, dict], None]) -> str:
        folder = root / name
        shutil.copytree(good, folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        change(folder, manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return str(folder)

    def truncate(folder: Path, manifest: dict, keep_size: bool) -> None:
        index = folder / "index.faiss"
        index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
        if keep_size:  # the manifest agrees: FAISS itself meets the short file
            manifest["index_bytes"] = index.stat().st_size

    (root / "empty").mkdir()
    return {
        "STORE": str(good),
        "EMPTY": str(root / "empty"),
        "WIDE": variant("wide", lambda f, m: m.update(hidden_size=64)),
        "BYTES": variant("bytes", lambda f, m: m.update(tokenizer="0" * 64)),
        "TRUNCATED": variant("truncated", lambda f, m: truncate(f, m, False)),
        "SHORT": variant("short", lambda f, m: truncate(f, m, True)),
        "NOINDEX": variant("noindex", lambda f, m: (f / "index.faiss").unlink()),
        "UNFINISHED": variant("unfinished", lambda f, m: m.update(complete=False)),
    }


@pytest.fixture(scope="module")
def byte_run(run: Path) -> Path:
    """A run with another tokenizer (bytes), beside ``run``: a draft that cannot serve it."""
    assert (
        main(
            [
                "train",
                "--quiet",
                *TINY,
                "data.tokenizer=byte",
                f"out_dir={run.parent}",
                "name=bytes",
            ]
        )
        == 0
    )
    return run.parent / "bytes"


BUILD = ["memory", "build", "RUN", "--out", "store"]
CASES = [
    ["train", "--resume"],
    ["train", "--bogus"],
    ["train", "model.widht=3"],
    ["train", "--preset", "gpt-tiny", "train.lr=nan"],
    ["train", "--nproc", "0"],
    ["compare", *ARMS, "--nproc-per-run", "2"],
    ["compare", *ARMS, "--parallel", "1", "--nproc-per-run", "0"],
    ["search", "SPACE.yaml", "--budget", "tokens=4k", "--nproc-per-run", "0"],
    ["train", "--nproc", "two"],
    ["train", "train.parallel=mpi"],
    ["train", "train.comm_timeout=0"],
    ["train", "train.comm_timeout=inf"],
    ["eval", "RUN", "--batches", "0"],
    ["eval", "RUN", "--seq-len", "-5"],
    ["eval", "RUN", "--split", "test"],
    ["eval", "RUN", "--batches", "many"],
    ["eval", "RUN", "--tasks", " , "],
    # Indexes every lm-eval task (seconds) to know the name is unknown.
    pytest.param(
        ["eval", "RUN", "--tasks", "lmlab_no_such_task", "--tasks-path", "RUN"],
        marks=pytest.mark.slow,
    ),
    ["eval", "RUN", "--tasks", "lmlab_no_such_task", "--tasks-path", "missing"],
    ["eval", "RUN", "--tasks", "arc_easy", "--limit", "0"],
    ["eval", "RUN", "--tasks", "arc_easy", "--num-fewshot", "-1"],
    ["eval", "RUN", "--tasks", "arc_easy", "--batch-size", "0"],
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
    ["serve", "RUN", "--port", "-1"],
    ["serve", "RUN", "--port", "65536"],
    ["serve", "RUN", "--host", "256.0.0.1", "--port", "0"],
    ["serve", "RUN", "--max-batch", "0"],
    ["serve", "RUN", "--max-tokens-limit", "0"],
    ["serve", "RUN", "--max-prompt-tokens", "-3"],
    ["serve", "RUN", "--max-concurrent", "many"],
    ["serve", "RUN", "--max-body-bytes", "0"],
    ["serve", "RUN", "--prefill-chunk", "0"],
    ["serve", "RUN", "--api-key", " ", "--port", "0"],
    ["serve", "RUN", "--device", "tpu", "--port", "0"],
    ["serve", "missing-run", "--port", "0"],
    ["serve", "RUNS", "--port", "0"],
    ["serve", "RUN", "--draft", "self:1", "--port", "0"],
    ["serve", "RUN", "--draft", "missing-run", "--port", "0"],
    ["serve", "RUN", "--draft", "BYTE_RUN", "--port", "0"],
    ["serve", "RUN", "--draft", "RUN", "--draft-tokens", "0", "--port", "0"],
    ["serve", "RUN", "--draft", "RUN", "--draft-confidence", "1", "--port", "0"],
    ["serve", "RUN", "--draft", "RUN", "--memory", "STORE", "--port", "0"],
    ["serve", "RUN", "--memory", "missing", "--port", "0"],
    ["serve", "RUN", "--memory", "WIDE", "--port", "0"],
    ["serve", "RUN", "--memory", "BYTES", "--port", "0"],
    ["serve", "RUN", "--memory", "TRUNCATED", "--port", "0"],
    ["serve", "RUN", "--knn-lambda", "0.5", "--port", "0"],
    ["serve", "RUN", "--memory", "STORE", "--knn-k", "100000", "--port", "0"],
    ["serve", "RUN", "--memory", "STORE", "--knn-temperature", "0", "--port", "0"],
    ["export", "RUN"],
    ["export", "RUN", "--format", "zip", "--out", "model.safetensors"],
    ["export", "RUN", "--out", "model.safetensors"],
    ["prepare", "missing.jsonl", "--out", "shards"],
    ["prepare", "org/dataset", "--out", "shards"],
    ["prepare", "SPACE", "--out", "shards", "--workers", "0"],
    ["prepare", "SPACE", "--out", "shards", "--tokenizer", "words"],
    ["prepare", "SPACE", "--out", "shards", "--tokenizer", "bpe", "--vocab-size", "100"],
    ["prepare", "SPACE", "--out", "shards", "--val-fraction", "1.5"],
    ["prepare", "SPACE", "--out", "shards", "--val-fraction", "nan"],
    ["prepare", "SPACE", "--out", "shards", "--shard-mb", "0"],
    ["prepare", "SPACE", "--out", "shards", "--sample-mb", "inf"],
    ["prepare", "SPACE", "--out", "shards", "--seed", "-1"],
    ["prepare", "SPACE", "--out", "shards", "--tokenizer-from", "nowhere"],
    ["prepare", "SPACE", "--out", "RUN"],
    ["prepare", "SPACE"],
    ["eval", "RUN", "--data", "nowhere.txt"],
    ["eval", "RUN", "--memory", "missing"],
    ["eval", "RUN", "--memory", "EMPTY"],
    ["eval", "RUN", "--knn-k", "5"],
    ["eval", "RUN", "--memory", "STORE", "--knn-k", "100000"],
    ["eval", "RUN", "--memory", "STORE", "--knn-k", "0"],
    ["eval", "RUN", "--memory", "STORE", "--knn-lambda", "1.5"],
    ["eval", "RUN", "--memory", "STORE", "--knn-lambda", "nan"],
    ["eval", "RUN", "--memory", "STORE", "--knn-temperature", "0"],
    ["eval", "RUN", "--memory", "STORE", "--knn-temperature", "inf"],
    ["eval", "RUN", "--memory", "WIDE"],
    ["eval", "RUN", "--memory", "BYTES"],
    ["eval", "RUN", "--memory", "TRUNCATED"],
    ["eval", "RUN", "--memory", "SHORT"],
    ["eval", "RUN", "--memory", "NOINDEX"],
    ["eval", "RUN", "--memory", "UNFINISHED"],
    ["generate", "RUN", "--memory", "TRUNCATED"],
    ["generate", "RUN", "--memory", "WIDE"],
    ["generate", "RUN", "--knn-lambda", "0.5"],
    ["generate", "RUN", "--memory", "STORE", "--knn-k", "100000"],
    ["memory", "build", "RUN"],
    ["memory", "rebuild", "RUN", "--out", "store"],
    ["memory", "build", "RUNS", "--out", "store"],
    [*BUILD, "--max-tokens", "-1"],
    [*BUILD, "--index", "ivfpq", "--max-tokens", "500"],
    [*BUILD, "--index", "hnsw"],
    [*BUILD, "--data", "nowhere.txt"],
    [*BUILD, "--split", "test"],
    [*BUILD, "--batch-size", "0"],
    ["memory", "build", "RUN", "--out", "STORE", "--max-tokens", "700"],
    ["memory", "build", "RUN", "--out", "SPACE.yaml"],
    ["generate", "RUN", "--draft", "self:1"],
    ["generate", "RUN", "--draft", "self:two"],
    ["generate", "RUN", "--draft", "missing-run"],
    ["generate", "RUN", "--draft", "BYTE_RUN"],
    ["generate", "RUN", "--draft", "RUN", "--draft-tokens", "0"],
    ["generate", "RUN", "--draft", "RUN", "--draft-confidence", "1"],
    ["quantize", "RUN", "--out", "small"],
    ["quantize", "RUN", "--int8", "--int4", "--out", "small"],
    ["quantize", "RUN", "--int4", "--group-size", "48", "--out", "small"],
    ["quantize", "RUN", "--int8"],
    ["quantize", "RUN", "--int8", "--out", "RUN"],
    ["quantize", "RUN", "--int8", "--out", "no/such/folder/small"],
    ["quantize", "missing-run", "--int8", "--out", "small"],
    ["quantize", "RUN", "--embeddings", "float", "--out", "small"],
    ["quantize", "RUN", "--int8", "--embeddings", "int4", "--out", "small"],
    ["quantize", "RUN", "--int4", "--embeddings", "fp16", "--out", "small"],
    ["quantize", "RUN", "--int4", "--embeddings", "--out", "small"],
    ["export", "RUN", "--format", "hf", "--out", "RUN"],
    ["export", "RUN", "--format", "hf", "--out", "RUN/config.yaml"],
    ["export", "RUN", "--format", "hf", "--out", "missing/hf"],
    ["export", "RUNS", "--format", "hf", "--out", "hf"],
    ["import", "RUN", "--out", "imported"],
    ["import", "missing", "--out", "imported"],
    ["import", "RUN"],
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
    argvs = [case.values[0] if hasattr(case, "values") else case for case in CASES]
    assert {argv[0] for argv in argvs} == {command.name for command in COMMANDS}


@pytest.mark.parametrize("argv", CASES, ids=" ".join)
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(
    argv, run, stores, byte_run, tmp_path, monkeypatch, capsys
):
    work = tmp_path / "work"
    work.mkdir()
    (work / "SPACE.yaml").write_text("base: gpt-tiny\nparams:\n  train.lr: [0.001, 0.01]\n")
    (work / "bad.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": 1}\n')
    monkeypatch.chdir(work)
    monkeypatch.setenv("LMLAB_REGISTRY", str(work / "registry.sqlite"))
    paths = {
        "RUN": str(run),
        "RUNS": str(run.parent),
        "SPACE": "SPACE.yaml",
        "BAD": "bad.jsonl",
        "BYTE_RUN": str(byte_run),
        **stores,
    }
    argv = [paths.get(arg, arg).replace("RUN@", f"{run}@") for arg in argv]
    before_cwd, before_run = files_under(work), files_under(run.parent)
    before_stores = files_under(Path(stores["STORE"]).parent)
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
    assert files_under(Path(stores["STORE"]).parent) == before_stores


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


def test_generate_with_a_draft_prints_the_same_greedy_text(run, capsys):
    """Speculative decoding with the run as its own draft: every token accepted, same text."""
    greedy = ["generate", str(run), "--prompt", "ROMEO:", "--temperature", "0"]
    assert main(greedy) == 0
    plain = capsys.readouterr().out
    assert main([*greedy, "--draft", str(run), "--draft-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    assert "(100%)" in captured.err
    assert main([*greedy, "--draft", str(run), "--draft-confidence", "0.5"]) == 0
    assert capsys.readouterr().out == plain

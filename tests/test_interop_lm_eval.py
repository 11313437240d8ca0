"""lmlab runs under lm-evaluation-harness: the adapter's log-likelihoods and generations equal
a direct computation with the model, and ``lmlab eval --tasks`` runs the YAML tasks of
tests/data/lm_eval (over the JSONL files there) offline and records the scores."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from interop_runs import make_run
from lm_eval.api.instance import Instance

from lmlab.cli import main
from lmlab.interop.harness import LmlabLM
from lmlab.model.generate import SamplingSettings, generate

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "lm_eval"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network, and the data-set cache in the test's folder."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-home" / "datasets"))


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "runs", "tiny", overrides=("data.seq_len=64",))


def docs(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


def direct_log_prob(lm: LmlabLM, context: list[int], target: list[int]) -> float:
    """log p(target | context) from one unbatched forward of the model."""
    ids = torch.tensor([context + target])
    with torch.no_grad():
        log_probs = F.log_softmax(lm.model(ids)[0][0].float(), -1)
    positions = range(len(context) - 1, len(context) + len(target) - 1)
    return sum(log_probs[p, t].item() for p, t in zip(positions, target, strict=True))


def tail_log_prob(lm: LmlabLM, inputs: list[int], targets: list[int]) -> float:
    """log p(targets) where the model reads ``inputs`` and predicts ``targets`` at its last
    ``len(targets)`` positions (target i after input i of that tail)."""
    with torch.no_grad():
        log_probs = F.log_softmax(lm.model(torch.tensor([inputs]))[0][0].float(), -1)
    tail = log_probs[len(inputs) - len(targets) :]
    return sum(tail[i, t].item() for i, t in enumerate(targets))


def request(kind: str, *args: object) -> Instance:
    return Instance(kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_matches_a_direct_computation(run: Path):
    """Batched and padded scoring of every (question, choice) pair, empty context included
    (scored after the newline prefix), equals one forward per pair; so does a continuation
    longer than the context, scored in windows that each see the 16 tokens before."""
    lm = LmlabLM(str(run), batch_size=4, device="cpu")
    pairs = [(doc["question"], choice) for doc in docs("mc.jsonl") for choice in doc["choices"]]
    got = lm.loglikelihood([request("loglikelihood", *pair) for pair in pairs])
    encode = lm.tokenizer.encode
    for (context, continuation), (log_prob, greedy) in zip(pairs, got, strict=True):
        head = encode(context) if context else encode("\n")
        expected = direct_log_prob(lm, head, encode(continuation))
        assert log_prob == pytest.approx(expected, abs=1e-4)
        assert isinstance(greedy, bool)
    short = LmlabLM(str(run), batch_size=4, device="cpu", max_length=16)
    context, continuation = encode("To be, or"), encode(" not to be, that is the question: whether")
    full = context + continuation
    expected = 0.0
    for start in range(len(context), len(full), 16):
        end = min(len(full), start + 16)
        expected += tail_log_prob(short, full[max(0, end - 17) : end - 1], full[start:end])
    ((log_prob, _),) = short.loglikelihood(
        [request("loglikelihood", "To be, or", " not to be, that is the question: whether")]
    )
    assert log_prob == pytest.approx(expected, abs=1e-4)


def test_loglikelihood_rolling_scores_disjoint_windows(run: Path):
    """A text longer than a 16-token context: windows of 16 predicted tokens, each reading
    the 16 tokens before its end (the first starts with the newline prefix)."""
    lm = LmlabLM(str(run), batch_size=3, device="cpu", max_length=16)
    text = "Whether 'tis nobler in the mind to suffer the slings"
    ids = lm.tokenizer.encode(text)
    assert len(ids) > 3 * lm.max_length and len(ids) % lm.max_length
    full = lm.tokenizer.encode("\n") + ids  # full[j] is the input that predicts ids[j]
    expected = 0.0
    for start in range(0, len(ids), 16):
        end = min(len(ids), start + 16)
        expected += tail_log_prob(lm, full[max(0, end - 16) : end], ids[start:end])
    (got,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    assert got == pytest.approx(expected, abs=1e-3)


def test_generate_until_decodes_greedily_with_the_cache(run: Path):
    """Prompts of several lengths (equal ones batched) continue as lmlab's greedy generation,
    cut before the first stop string."""
    lm = LmlabLM(str(run), batch_size=2, device="cpu")
    prompts = [doc["prompt"] for doc in docs("gen.jsonl")] + ["To be, or no"]
    settings = {"until": ["e", "\n"], "max_gen_toks": 6, "do_sample": False}
    got = lm.generate_until([request("generate_until", p, settings) for p in prompts])
    for prompt, text in zip(prompts, got, strict=True):
        ids = torch.tensor([lm.tokenizer.encode(prompt)])
        new = generate(lm.model, ids, 6, SamplingSettings(temperature=0))[0, ids.shape[1] :]
        full = lm.tokenizer.decode(new.tolist())
        cuts = [full.find(stop) for stop in ("e", "\n") if stop in full]
        assert text == (full[: min(cuts)] if cuts else full)


def test_lmlab_eval_tasks_scores_and_records(run: Path, tmp_path: Path, capsys, monkeypatch):
    """``lmlab eval --tasks`` offline on a multiple-choice and a generation task: accuracy is
    the share of questions whose answer has the highest direct log-likelihood, exact match the
    share of greedy continuations equal to the target; both land in lm_eval.json and the
    registry."""
    monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository
    registry = tmp_path / "registry.sqlite"
    argv = ["eval", str(run), "--tasks", "lmlab_test_mc,lmlab_test_gen", "--tasks-path"]
    assert main([*argv, str(DATA), "--registry", str(registry), "--device", "cpu"]) == 0
    assert "lmlab_test_mc: acc " in capsys.readouterr().out
    saved = json.loads((run / "lm_eval.json").read_text())["tasks"]
    lm = LmlabLM(str(run), device="cpu")
    encode = lm.tokenizer.encode
    correct = []
    for doc in docs("mc.jsonl"):
        head = encode(doc["question"]) if doc["question"] else encode("\n")
        scores = [direct_log_prob(lm, head, encode(choice)) for choice in doc["choices"]]
        correct.append(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    assert saved["lmlab_test_mc"]["metrics"]["acc"] == pytest.approx(sum(correct) / len(correct))
    assert saved["lmlab_test_mc"]["samples"] == len(correct)
    matches = []
    for doc in docs("gen.jsonl"):
        ids = torch.tensor([encode(doc["prompt"])])
        new = generate(lm.model, ids, 8, SamplingSettings(temperature=0))[0, ids.shape[1] :]
        matches.append(lm.tokenizer.decode(new.tolist()).split("\n")[0] == doc["target"])
    exact = saved["lmlab_test_gen"]["metrics"]["exact_match"]
    assert exact == pytest.approx(sum(matches) / len(matches))
    with sqlite3.connect(registry) as connection:
        rows = {
            (task, metric): value
            for task, metric, value in connection.execute("SELECT task, metric, value FROM evals")
        }
    assert rows[("lmlab_test_mc", "acc")] == saved["lmlab_test_mc"]["metrics"]["acc"]
    assert rows[("lmlab_test_gen", "exact_match")] == exact


def test_compare_tasks_scoreboard_passes_and_fails_per_task(tmp_path, corpus, monkeypatch, capsys):
    """``lmlab compare --tasks``: every run is scored, each candidate gets PASS/FAIL per task
    against the baseline's mean under the rule's tolerance, and a task drop beyond it blocks
    promotion; a rerun reuses runs and scores."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("LMLAB_REGISTRY", str(tmp_path / "registry.sqlite"))
    tiny = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "data.seq_len=32"]
    args = [
        "compare", "gpt-tiny", "--variant", "model.d_model=24", "--seeds", "1", "--budget",
        "tokens=2k", "--quiet", "--out", str(tmp_path / "cmp"), "--tasks",
        "lmlab_test_mc,lmlab_test_gen", "--tasks-path", str(DATA), *tiny,
        "train.batch_size=8", "train.eval_batches=1", "train.threads=1", f"data.path={corpus}",
    ]  # fmt: skip
    assert main(args) in (0, 1)
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    (candidate,) = results["scoreboard"]
    rows = {row["task"]: row for row in results["scoreboard"][candidate]}
    assert set(rows) == {"lmlab_test_mc", "lmlab_test_gen"}
    by_arm: dict[str, list[float]] = {}
    for run in results["runs"]:
        saved = json.loads((Path(run["path"]) / "lm_eval.json").read_text())["tasks"]
        by_arm.setdefault(run["arm"], []).append(saved["lmlab_test_mc"]["metrics"]["acc"])
    mc = rows["lmlab_test_mc"]
    assert mc["metric"] == "acc" and mc["higher_is_better"]
    assert mc["baseline"] == pytest.approx(by_arm["gpt-tiny"][0])
    assert mc["candidate"] == pytest.approx(by_arm[candidate][0])
    assert mc["gain"] == pytest.approx(mc["candidate"] - mc["baseline"])
    assert mc["passed"] == (mc["gain"] >= -0.02)
    assert rows["lmlab_test_gen"]["metric"] == "exact_match"

    for run in results["runs"]:  # the candidate now answers every question wrong
        path = Path(run["path"]) / "lm_eval.json"
        saved = json.loads(path.read_text())
        saved["tasks"]["lmlab_test_mc"]["metrics"]["acc"] = 0.0 if run["arm"] == candidate else 0.5
        path.write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(args) in (0, 1)
    out = capsys.readouterr().out
    assert "FAIL lmlab_test_mc acc: 0.0000 vs 0.5000 (gain -0.5000)" in out
    rerun = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert {run["how"] for run in rerun["runs"]} == {"reused"}
    (verdict,) = rerun["verdicts"]
    assert verdict["decision"] != "PROMOTE"
    assert "lm-eval task lmlab_test_mc (acc) drops 0.5 > tolerance 0.02: fail" in verdict["reasons"]
    assert "## lm-eval scoreboard" in (tmp_path / "cmp" / "report.md").read_text()

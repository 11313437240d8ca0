"""The kNN-LM retrieval memory: the mixture against a direct computation, exact search against
brute force, the build (chunks, resume, IVF-PQ) and a store of the evaluated text itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from conftest import TINY_RUN

from lmlab.cli import main
from lmlab.config.schema import DataConfig
from lmlab.data.dataset import prepare_data, with_source
from lmlab.errors import LmlabError, ParamError
from lmlab.memory import store as store_module
from lmlab.memory.knn import (
    KnnSettings,
    evaluate_with_memory,
    interpolate,
    knn_hook,
    knn_log_probs,
    knn_logits,
)
from lmlab.memory.store import KnnStore, build_store, ivfpq_params, new_index, open_store
from lmlab.model.generate import SamplingSettings, generate
from lmlab.train.run import RunHold, load_trained_model

TINY = [*TINY_RUN, "model.n_layers=1", "train.max_steps=3", "train.eval_batches=1"]


def memory_store(keys: np.ndarray, values: np.ndarray) -> KnnStore:
    index = faiss.IndexFlatL2(keys.shape[1])
    index.add(keys.astype(np.float32))
    return KnnStore(Path("mem"), index, values.astype(np.int32), {})


def test_mixture_equals_the_direct_formula():
    """p = lambda p_knn + (1 - lambda) p_lm with p_knn(y) the normalised sum of exp(-d / T)
    over the neighbours valued y, written out with loops over a 3-entry store."""
    keys = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    values = np.array([2, 0, 2])
    store = memory_store(keys, values)
    query = torch.tensor([[0.5, 0.5]])
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.1]])
    lam, temperature = 0.3, 0.7
    got = knn_logits(store, query, logits, KnnSettings(lam, 3, temperature)).exp()[0]

    lm = torch.softmax(logits[0].double(), -1)
    weights = {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}
    for key, value in zip(keys, values, strict=True):
        distance = float(((key - query[0].numpy()) ** 2).sum())
        weights[int(value)] += math.exp(-distance / temperature)
    total = sum(weights.values())
    expected = [lam * weights[y] / total + (1 - lam) * float(lm[y]) for y in range(4)]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(got.sum()) == pytest.approx(1.0, rel=1e-6)


def test_rows_without_neighbours_keep_the_model_and_lambda_edges():
    logits = torch.randn(2, 5)
    distances = torch.tensor([[1.0, math.inf], [math.inf, math.inf]])
    values = torch.tensor([[3, -1], [-1, -1]])
    knn = knn_log_probs(distances, values, 5, 1.0)
    assert knn[0].exp().tolist() == pytest.approx([0, 0, 0, 1, 0])
    assert torch.isneginf(knn[1]).all()
    mixed = interpolate(logits, knn, 0.5)
    lm = torch.log_softmax(logits, -1)
    torch.testing.assert_close(mixed[1], lm[1])
    assert mixed[0, 3].exp().item() == pytest.approx(0.5 + 0.5 * lm[0, 3].exp().item(), rel=1e-6)
    torch.testing.assert_close(interpolate(logits, knn, 0.0), lm)
    assert interpolate(logits, knn, 1.0)[0].exp().tolist() == pytest.approx([0, 0, 0, 1, 0])


def test_flat_search_returns_the_true_nearest_neighbours():
    generator = np.random.default_rng(0)
    keys = generator.standard_normal((500, 24)).astype(np.float32)
    values = np.arange(500)
    store = memory_store(keys, values)
    queries = torch.from_numpy(generator.standard_normal((40, 24)).astype(np.float32))
    distances, found = store.search(queries, 7)
    true = torch.cdist(queries.double(), torch.from_numpy(keys).double()) ** 2
    expected_d, expected_i = true.topk(7, largest=False)
    assert found.tolist() == expected_i.tolist()  # values are the ids here
    torch.testing.assert_close(distances.double(), expected_d, rtol=1e-4, atol=1e-4)


def test_k_larger_than_the_store_is_refused():
    store = memory_store(np.zeros((3, 2)), np.zeros(3))
    with pytest.raises(ParamError, match="knn_k=4 must be between 1 and the store's 3"):
        store.search(torch.zeros(1, 2), 4)
    with pytest.raises(ParamError, match="knn_k=4 must be at least 1 and at most"):
        KnnSettings(knn_k=4).validate(3)


def test_ivfpq_finds_most_true_neighbours_of_clustered_keys():
    """IVF-PQ is approximate: on clustered keys its top-10 should mostly be the exact ones."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((50, 32)) * 4
    keys = (centres[rng.integers(0, 50, 12_000)] + rng.standard_normal((12_000, 32))).astype(
        np.float32
    )
    params = ivfpq_params(len(keys), 32)
    assert (params.nlist, params.m, params.nprobe) == (128, 4, 32)
    index = new_index(32, len(keys), "ivfpq")
    index.train(keys[: params.training_size(len(keys))])
    index.add(keys)
    flat = new_index(32, len(keys), "flat")
    flat.add(keys)
    queries = keys[:200] + rng.standard_normal((200, 32)).astype(np.float32) * 0.1
    _, approximate = index.search(queries, 10)
    _, exact = flat.search(queries, 10)
    overlap = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact, strict=True)])
    assert overlap > 0.5


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny char run trained on a small text file (so its validation split is short)."""
    root = tmp_path_factory.mktemp("memory")
    lines = [f"{i} the quick brown fox {i * 7 % 13} jumps over the lazy dog." for i in range(900)]
    (root / "text.txt").write_text("\n".join(lines), encoding="utf-8")
    assert (
        main(["train", "--quiet", *TINY, f"data.path={root / 'text.txt'}", f"out_dir={root}"]) == 0
    )
    return next(p for p in root.iterdir() if p.is_dir())


def test_a_store_of_the_evaluated_text_strongly_lowers_the_loss(text_run, tmp_path):
    """Sanity (the paper's upper bound): every evaluated context is in the store with its true
    next token at distance 0, so p >= lambda on the target and the loss drops toward
    -log(lambda); values are the next tokens, keys the features of the same windows."""
    manifest = build_store(text_run, tmp_path / "s", split="val", show_progress=False)
    assert manifest["index"] == "flat" and manifest["complete"]
    config, model, tokenizer, _ = load_trained_model(text_run)
    data, _ = prepare_data(config.data, tokenizer)
    assert manifest["entries"] == len(data.val) - 1
    store = open_store(tmp_path / "s")
    store.check_model(32, tokenizer, text_run)
    result = evaluate_with_memory(
        model,
        data,
        store,
        KnnSettings(0.5, 4, 1e-3),
        batch_size=4,
        seq_len=config.data.seq_len,
        max_batches=10_000,
        device=torch.device("cpu"),
    )
    assert result["tokens"] == (len(data.val) - 1) // 32 * 32
    assert result["loss"] > 1.5
    assert result["memory_loss"] < math.log(2) + 0.05
    assert result["memory_bits_per_byte"] < 0.5 * result["bits_per_byte"]

    prompt = torch.tensor([tokenizer.encode_array("the quick").tolist()])
    plain = generate(model, prompt, 8, SamplingSettings(temperature=0))
    unmixed = knn_hook(store, KnnSettings(knn_lambda=0.0))
    hooked = generate(model, prompt, 8, SamplingSettings(temperature=0), logits_hook=unmixed)
    torch.testing.assert_close(plain, hooked)
    hook = knn_hook(store, KnnSettings(knn_lambda=1.0, knn_k=1))
    hidden, _ = model.features(prompt)
    step = hook(hidden[:, -1], model.head(hidden[:, -1]))
    assert step.exp().max().item() == pytest.approx(1.0)


def test_an_interrupted_build_continues_where_it_stopped(text_run, tmp_path, monkeypatch):
    cut = {"chunk_tokens": 64, "max_tokens": 600, "show_progress": False}  # 10 chunks
    whole = build_store(text_run, tmp_path / "whole", **cut)
    saved = []
    real_save = store_module.save_array

    def failing_save(path: Path, array: np.ndarray) -> None:
        saved.append(path.name)
        if len(saved) == 5:  # the third chunk's keys
            raise KeyboardInterrupt
        real_save(path, array)

    monkeypatch.setattr(store_module, "save_array", failing_save)
    with pytest.raises(KeyboardInterrupt):
        build_store(text_run, tmp_path / "cut", **cut)
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert len(manifest["chunks"]) == 2 and not manifest["complete"]
    with pytest.raises(LmlabError, match="unfinished"):
        open_store(tmp_path / "cut")
    monkeypatch.setattr(store_module, "save_array", real_save)
    resumed = build_store(text_run, tmp_path / "cut", **cut)
    assert resumed["entries"] == whole["entries"] == 600 and resumed["complete"]
    assert len(resumed["chunks"]) == 10
    assert not (tmp_path / "cut" / "chunks").exists()
    a, b = open_store(tmp_path / "whole"), open_store(tmp_path / "cut")
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(
        a.index.reconstruct_n(0, a.size), b.index.reconstruct_n(0, b.size)
    )
    with pytest.raises(LmlabError, match="built with split='train', not 'val'"):
        build_store(text_run, tmp_path / "cut", **(cut | {"split": "val"}))


def test_ivfpq_store_builds_and_serves(text_run, tmp_path):
    manifest = build_store(
        text_run, tmp_path / "pq", index="ivfpq", max_tokens=12_000, show_progress=False
    )
    assert manifest["index"] == "ivfpq" and manifest["ivfpq"]["nlist"] == 128
    store = open_store(tmp_path / "pq")
    assert store.size == 12_000
    distances, values = store.search(torch.randn(3, 32), 8)
    assert values.shape == (3, 8) and ((values >= 0) & (values < 40)).all()
    assert torch.isfinite(distances).all() and (distances.diff(dim=1) >= 0).all()
    with pytest.raises(ParamError, match="index=ivfpq needs at least 10000"):
        build_store(text_run, tmp_path / "small", index="ivfpq", max_tokens=500)
    assert not (tmp_path / "small").exists()


def test_a_second_build_of_the_same_folder_is_refused(text_run, tmp_path):
    (tmp_path / "s").mkdir()
    hold = RunHold(tmp_path / "s")
    try:
        with pytest.raises(LmlabError, match="in use by another lmlab process"):
            build_store(text_run, tmp_path / "s", max_tokens=100, show_progress=False)
    finally:
        hold.release()
    assert build_store(text_run, tmp_path / "s", max_tokens=100, show_progress=False)["complete"]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "index.faiss",
        "manifest.json",
        "values.npy",
    ]


def test_data_sources_keep_the_split_settings(tmp_path):
    cfg = DataConfig(val_fraction=0.2, seed=3, edition="modern")
    assert with_source(cfg, "run") is cfg
    folio = with_source(cfg, "folio")
    assert (folio.edition, folio.path, folio.val_fraction, folio.seed) == ("folio", "", 0.2, 3)
    (tmp_path / "t.txt").write_text("text")
    assert with_source(cfg, str(tmp_path / "t.txt")).path == str(tmp_path / "t.txt")
    with pytest.raises(LmlabError, match="neither run, modern, folio"):
        with_source(cfg, str(tmp_path / "missing.txt"))

"""kNN-LM retrieval memory: what it does to bits per byte, what it costs; prints Markdown.

quality RUN  Build stores (``lmlab.memory.store.build_store``, resumable: an interrupted run
             continues) from the training split of the modern and of the First Folio edition of
             the embedded corpus, then score each validation split without and with a store over
             a sweep of lambda, k and temperature (one forward and one search per window; the
             mixture is recomputed per setting). The Folio rows are the paper's domain
             adaptation check: the model was trained on the modern edition only.
latency      Query latency per token of FAISS stores of synthetic clustered 192-wide keys (the
             gpt-tiny hidden size): exact flat and IVF-PQ at 1M entries, IVF-PQ at 10M, with
             lmlab's index settings (``new_index``), at 1 query per call (generation) and
             ``--query-batch`` per call (evaluation); plus build (add) keys/s and index size.

    python benchmarks/bench_knn.py quality runs/gpt-tiny-... --out /tmp/knn-stores
    python benchmarks/bench_knn.py latency --sizes 1000000,10000000
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch
from timing import machine, print_table

from lmlab.data.dataset import eval_batches, prepare_data, with_source
from lmlab.memory.knn import interpolate, knn_log_probs
from lmlab.memory.store import (
    FLAT_LIMIT,
    build_store,
    ivfpq_params,
    new_index,
    open_store,
    resolve_index_kind,
)
from lmlab.train.run import load_trained_model

DIM = 192


def cpu_line(threads: int) -> str:
    return f"{machine()}, {threads} threads, faiss {faiss.__version__}"


def numbers(text: str, kind: type = float) -> list:
    return [kind(item) for item in text.split(",")]


@torch.no_grad()
def score(run: str, store_dir: Path, data: str, args: argparse.Namespace) -> list[tuple]:
    """(store, lambda, k, temperature, bits/byte without, with) over the sweep, on the
    validation windows of ``data`` (the evaluation's windows, float32)."""
    config, model, tokenizer, _ = load_trained_model(run)
    tokens, _ = prepare_data(with_source(config.data, data), tokenizer)
    store = open_store(store_dir)
    k_max = max(numbers(args.ks, int))
    lm_total, count, mixed_totals = 0.0, 0, {}
    windows = eval_batches(tokens.val, config.train.batch_size, config.data.seq_len, args.batches)
    for x, y in windows:
        hidden, _ = model.features(x)
        logits = model.head(hidden).flatten(0, 1)
        hidden, target = hidden.flatten(0, 1), y.flatten()
        lm_total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        count += target.numel()
        distances, values = store.search(hidden, k_max)
        for k in numbers(args.ks, int):
            for temperature in numbers(args.temperatures):
                knn = knn_log_probs(distances[:, :k], values[:, :k], logits.shape[-1], temperature)
                for lam in numbers(args.lambdas):
                    mixed = interpolate(logits, knn, lam).gather(1, target[:, None])
                    key = (lam, k, temperature)
                    mixed_totals[key] = mixed_totals.get(key, 0.0) - mixed.sum().item()
    base = tokens.bits_per_byte(lm_total / count)
    return [(key, base, tokens.bits_per_byte(total / count)) for key, total in mixed_totals.items()]


def quality(args: argparse.Namespace) -> None:
    out = Path(args.out)
    stores = {}
    for data in ("modern", "folio"):
        started = time.perf_counter()
        manifest = build_store(
            args.run, out / data, data=data, max_tokens=args.max_tokens, index=args.index
        )
        stores[data] = out / data
        size = sum(f.stat().st_size for f in (out / data).iterdir())
        print(
            f"store {data}: {manifest['entries']:,} entries, {manifest['index']} index, "
            f"{size / 2**20:.1f} MiB on disk, keys at "
            f"{manifest['entries'] / manifest['key_seconds']:,.0f} tokens/s, index built in "
            f"{manifest['index_seconds']:.1f} s (this call: {time.perf_counter() - started:.0f} s)"
        )
    rows = []
    for data, store in (("modern", "modern"), ("folio", "folio"), ("folio", "modern")):
        for (lam, k, temperature), base, mixed in score(args.run, stores[store], data, args):
            rows.append(
                (
                    data,
                    store,
                    lam,
                    k,
                    temperature,
                    f"{base:.4f}",
                    f"{mixed:.4f}",
                    f"{mixed - base:+.4f}",
                )
            )
    print_table(
        (
            "val split",
            "store (train split)",
            "lambda",
            "k",
            "T",
            "bpb without",
            "bpb with",
            "change",
        ),
        rows,
        align="llrrrrrr",
    )


def clustered(count: int, seed: int, centres: np.ndarray) -> np.ndarray:
    """Keys around random centres, so that an inverted file has structure to exploit (hidden
    states cluster by context); float32 [count, DIM]."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(centres), count)
    return (centres[picks] + rng.standard_normal((count, DIM), dtype=np.float32)).astype(np.float32)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one call. On a machine shared with other jobs the wall time
    includes waiting for a core; the CPU time (one thread) is the work itself."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def latency_rows(args: argparse.Namespace):
    """One row per (size, index kind), yielded as soon as it is measured."""
    centres = np.random.default_rng(0).standard_normal((4096, DIM), dtype=np.float32) * 3
    queries = clustered(args.query_batch, 99, centres)
    for size in numbers(args.sizes, int):
        for kind in ["flat", "ivfpq"] if size <= FLAT_LIMIT else ["ivfpq"]:
            index = new_index(DIM, size, resolve_index_kind(kind, size))
            started = time.perf_counter()
            if kind == "ivfpq":
                params = ivfpq_params(size, DIM)
                index.train(clustered(params.training_size(size), 1, centres))
            trained = time.perf_counter()
            for offset in range(0, size, args.chunk):
                index.add(clustered(min(args.chunk, size - offset), 2 + offset, centres))
            added = time.perf_counter()
            with tempfile.TemporaryDirectory() as folder:
                faiss.write_index(index, f"{folder}/i")
                size_mb = Path(f"{folder}/i").stat().st_size / 2**20
            single = [
                timed(functools.partial(index.search, queries[row : row + 1], args.k))
                for row in range(args.single_queries)
            ]
            batched = timed(functools.partial(index.search, queries, args.k))
            setting = (
                f"nlist {index.nlist}, m {params.m}, nprobe {index.nprobe}"
                if kind == "ivfpq"
                else "exact"
            )
            yield (
                f"{size:,}",
                kind,
                setting,
                f"{size_mb:,.0f}",
                f"{trained - started:.1f}",
                f"{size / (added - trained):,.0f}",
                *(f"{1000 * np.median([t[i] for t in single]):.3f}" for i in (0, 1)),
                *(f"{1000 * t / len(queries):.3f}" for t in batched),
            )
            del index


def latency(args: argparse.Namespace) -> None:
    print_table(
        (
            "entries",
            "index",
            "settings",
            "MiB",
            "train s",
            "add keys/s",
            "ms/token (1 query)",
            "CPU ms/token (1 query)",
            f"ms/token ({args.query_batch} per call)",
            f"CPU ms/token ({args.query_batch} per call)",
        ),
        latency_rows(args),
        align="lllrrrrrrr",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    sections = parser.add_subparsers(dest="section", required=True)
    q = sections.add_parser("quality")
    q.add_argument("run")
    q.add_argument("--out", required=True, help="folder for the stores (reused if there)")
    q.add_argument("--max-tokens", type=int, default=0, help="entries per store, 0 for all")
    q.add_argument("--index", default="auto")
    q.add_argument("--batches", type=int, default=16, help="evaluation batches per split")
    q.add_argument("--lambdas", default="0.1,0.25,0.5")
    q.add_argument("--ks", default="16,64")
    q.add_argument("--temperatures", default="1,10,100")
    lat = sections.add_parser("latency")
    lat.add_argument("--sizes", default="1000000,10000000")
    lat.add_argument("--k", type=int, default=16)
    lat.add_argument("--query-batch", type=int, default=1024)
    lat.add_argument("--single-queries", type=int, default=20)
    lat.add_argument("--chunk", type=int, default=500_000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    print(cpu_line(args.threads) + "; machine shared with other jobs")
    quality(args) if args.section == "quality" else latency(args)


if __name__ == "__main__":
    main()

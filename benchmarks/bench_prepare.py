"""Tokenisation throughput of ``lmlab prepare`` against the ``tokenizers`` library's own batch
encoder (``Tokenizer.encode_batch``) on the same text.

Why: ``prepare`` adds reading, splitting, shard writing and checksums around the encoder, and
runs it in worker processes; this shows what that costs against the field's encoder working on
text already in memory (its best case: no reading, no writing). The text is the embedded
Shakespeare corpus, one work per JSONL line, repeated to about ``--mb`` megabytes. BPE: a
byte-level BPE of ``--vocab-size`` trained by lmlab once (not timed) and handed to both sides,
so both produce the same vocabulary. Byte: lmlab's byte tokenizer against a 256-token
byte-level BPE (no merges) in ``tokenizers``. ``encode_batch`` gets the documents 16 at a time
(all at once would hold every ``Encoding`` of 50 MB in memory: over 6 GB for bytes). Each row
is timed once, after an untimed warm-up on a small part. (Memory: tests/test_shards.py checks
that a 256 MB file is prepared with a peak resident set well under 160 MB.)

Usage:
    PYTHONPATH=src .venv/bin/python benchmarks/bench_prepare.py [--mb 50] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from timing import machine, print_table
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmlab.data.corpus import load_embedded_corpus
from lmlab.data.prepare import prepare_shards
from lmlab.data.tokenizers import BpeTokenizer, train_tokenizer

HF_BATCH = 16


def hf_byte_tokenizer() -> HFTokenizer:
    """A byte-level BPE with the 256 byte tokens and no merges: ``tokenizers``' byte encoder."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["a"], trainer=trainer)
    return tok


def corpus(megabytes: float) -> list[str]:
    works = [doc.text for doc in load_embedded_corpus("modern")]
    size = sum(len(w.encode()) for w in works)
    copies = max(1, round(megabytes * 1e6 / size))
    return [f"{text}\n[copy {i}]" for i in range(copies) for text in works]


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished children (the workers):
    on a machine shared with other jobs, a steadier measure of the work than wall time."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed_prepare(source: Path, out: Path, **kwargs) -> tuple[float, float, dict]:
    start, cpu = time.perf_counter(), cpu_seconds()
    summary = prepare_shards(str(source), str(out), show_progress=False, **kwargs)
    return time.perf_counter() - start, cpu_seconds() - cpu, summary


def timed_hf(tok: HFTokenizer, texts: list[str], fast: bool) -> tuple[float, float, int]:
    """``encode_batch`` over batches of :data:`HF_BATCH` documents, keeping only the token count:
    one call on all 50 MB holds every ``Encoding`` (ids, offsets, token strings) at once, over
    6 GB for the byte tokenizer."""
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    tokens = 0
    start, cpu = time.perf_counter(), cpu_seconds()
    for i in range(0, len(texts), HF_BATCH):
        tokens += sum(len(e.ids) for e in encode(texts[i : i + HF_BATCH], add_special_tokens=False))
    return time.perf_counter() - start, cpu_seconds() - cpu, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--shard-mb", type=float, default=8.0)
    args = parser.parse_args()
    texts = corpus(args.mb)
    n_bytes = sum(len(t.encode()) for t in texts)
    print(
        f"{machine()}; text: {len(texts)} "
        f"documents, {n_bytes / 1e6:.1f} MB; workers {args.workers}; shard {args.shard_mb} MB\n"
    )
    bpe = train_tokenizer("bpe", texts[:42], args.vocab_size)
    assert isinstance(bpe, BpeTokenizer)
    header = ("tokenizer", "encoder", "wall s", "MB/s", "CPU s", "MB per CPU s", "M tokens")
    print_table(header, rows(texts, bpe, n_bytes, args), align="llrrrrr")


def rows(texts: list[str], bpe: BpeTokenizer, n_bytes: int, args: argparse.Namespace):
    """One table row per (tokenizer, encoder), yielded as soon as it is measured."""

    def row(kind: str, label: str, seconds: float, cpu: float, tokens: int) -> tuple:
        mb = n_bytes / 1e6
        return (kind, label, f"{seconds:.1f}", f"{mb / seconds:.2f}", f"{cpu:.1f}",
                f"{mb / cpu:.2f}", f"{tokens / 1e6:.1f}")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = root / "corpus.jsonl"
        with source.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        bpe.save(root / "bpe" / "tokenizer")
        hf = {"bpe": bpe._tok, "byte": hf_byte_tokenizer()}
        kinds = {"bpe": {"tokenizer_from": str(root / "bpe")}, "byte": {"tokenizer": "byte"}}
        for kind, settings in kinds.items():
            warm = root / f"warm-{kind}.jsonl"
            warm.write_text("".join(json.dumps({"text": t[:20_000]}) + "\n" for t in texts[:42]))
            timed_prepare(warm, root / f"warm-{kind}", workers=1, **settings)
            hf[kind].encode_batch(texts[:4])
            for workers in sorted({1, args.workers}):
                seconds, cpu, summary = timed_prepare(
                    source, root / f"{kind}-{workers}", workers=workers,
                    shard_mb=args.shard_mb, **settings,
                )  # fmt: skip
                tokens = summary["train_tokens"] + summary["val_tokens"]
                label = f"lmlab prepare, {workers} worker{'s' * (workers > 1)}"
                yield row(kind, label, seconds, cpu, tokens)
            for fast in (False, True):
                seconds, cpu, tokens = timed_hf(hf[kind], texts, fast)
                name = "encode_batch_fast" if fast else "encode_batch"
                yield row(kind, f"tokenizers {name} (in memory)", seconds, cpu, tokens)


if __name__ == "__main__":
    main()

"""``lmlab prepare``: shards that equal the corpus encoded directly, a split decided by document
hash, several workers agreeing with one, resuming after a kill, the checks training makes, and
the first shard format still read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from lmlab.cli import main
from lmlab.data.corpus import SEPARATOR, read_text_source
from lmlab.data.prepare import document_side, prepare_shards
from lmlab.data.shards import read_shards
from lmlab.data.tokenizers import tokenizer_state, train_tokenizer
from lmlab.data.tokens import ShardedTokens
from lmlab.errors import LmlabError, ParamError

SMALL = 0.004
"""Megabytes per shard in these tests (about 4 KB), so a small corpus makes many shards."""


@pytest.fixture
def stories(tmp_path: Path) -> Path:
    """A JSONL file of 300 distinct stories (about 50 KB)."""
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "sword", "castle", "ran", "slept", "über", "naïve", "!"]
    path = tmp_path / "stories.jsonl"
    lines = [
        json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(5, 60)))), "n": i})
        for i in range(300)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _tokens(folder: Path, split: str) -> np.ndarray:
    data, _ = read_shards(folder)
    return np.asarray(getattr(data, split))


def test_document_side_is_a_stable_hash_of_the_name():
    names = [f"file.jsonl:{i}" for i in range(20_000)]
    sides = [document_side(n, 0.1, 0) for n in names]
    assert 0.09 < sides.count("val") / len(sides) < 0.11
    assert sides == [document_side(n, 0.1, 0) for n in names]
    assert sides != [document_side(n, 0.1, 1) for n in names]
    assert all(
        document_side(n, 0.2, 0) == "val" for n, s in zip(names, sides, strict=True) if s == "val"
    )


def test_shards_hold_each_document_once_on_its_hashed_side(stories, tmp_path):
    out = tmp_path / "shards"
    summary = prepare_shards(str(stories), str(out), "byte", workers=1, shard_mb=SMALL,
                             show_progress=False)  # fmt: skip
    assert summary["shards"] > 10 and summary["skipped"] == 0
    docs = read_text_source(stories)
    for split in ("train", "val"):
        expected = "".join(
            d.text + SEPARATOR for d in docs if document_side(d.name, 0.1, 0) == split
        )
        assert bytes(_tokens(out, split).tolist()).decode() == expected
    data, tok = read_shards(out)
    assert isinstance(data.train, ShardedTokens) and tok.kind == "byte"
    assert data.train_bytes == len(bytes(_tokens(out, "train").tolist()))
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["split"]["method"] == "hash" and meta["source"]["files"][0]["path"] == "."
    assert sum(meta["documents"].values()) == len(docs) == 300


def test_two_workers_write_the_same_shards_as_one(stories, tmp_path):
    for workers in (1, 2):
        prepare_shards(str(stories), str(tmp_path / f"w{workers}"), "bpe", vocab_size=300,
                       workers=workers, shard_mb=0.01, show_progress=False)  # fmt: skip
    one, two = (json.loads((tmp_path / f"w{w}" / "manifest.json").read_text()) for w in (1, 2))
    assert len(one["shards"]) > 4
    assert one["shards"] == two["shards"] and one["tokenizer"] == two["tokenizer"]


def test_one_text_file_is_split_by_its_tail_with_the_ids_of_the_whole_text(tmp_path):
    path = tmp_path / "book.txt"
    text = "".join(f"Line {i}: to be, or not to be.\n  indented {i}\n\nEnd.\n" for i in range(2000))
    path.write_text(text)
    tok = train_tokenizer("bpe", [text], 400)
    tok.save(tmp_path / "run" / "tokenizer")
    out = tmp_path / "shards"
    prepare_shards(str(path), str(out), tokenizer_from=str(tmp_path / "run"), workers=2,
                   shard_mb=0.01, val_fraction=0.2, show_progress=False)  # fmt: skip
    train, val = _tokens(out, "train"), _tokens(out, "val")
    train_text = tok.decode(train)
    assert train_text + tok.decode(val) == text + SEPARATOR
    assert 0.75 < len(train_text) / len(text) < 0.85 and train_text.endswith("\n")
    hf = HFTokenizer.from_str(tokenizer_state(tok)[1])
    assert train.tolist() == hf.encode(train_text, add_special_tokens=False).ids
    assert read_shards(out)[1] == tok


def test_a_rerun_skips_verified_shards_and_redoes_what_a_kill_left(stories, tmp_path):
    """What ``kill -9`` can leave at any moment: temporary files, a shard renamed without its
    record, a record whose shard was cut short, no manifest. The rerun must end where a clean
    run ends."""
    clean, out = tmp_path / "clean", tmp_path / "out"
    for folder in (clean, out):
        prepare_shards(str(stories), str(folder), "char", workers=1, shard_mb=SMALL,
                       show_progress=False)  # fmt: skip
    (out / "manifest.json").unlink()
    (out / ".train-00003.bin.999.tmp").write_bytes(b"\x01\x02")
    (out / "parts" / "00001.json").unlink()
    shard = out / "train-00002.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(LmlabError, match="unfinished lmlab prepare"):
        read_shards(out)
    summary = prepare_shards(str(stories), str(out), "char", workers=1, shard_mb=SMALL,
                             show_progress=False)  # fmt: skip
    units = summary["units"]
    assert summary["skipped"] == units - 2
    assert (
        json.loads((out / "manifest.json").read_text())["shards"]
        == json.loads((clean / "manifest.json").read_text())["shards"]
    )
    assert not list(out.glob(".*.tmp"))


def test_one_folder_holds_one_tokenizer_and_one_source(stories, tmp_path):
    out = tmp_path / "shards"
    prepare_shards(str(stories), str(out), "char", workers=1, show_progress=False)
    with pytest.raises(LmlabError, match="holds shards of another tokenizer"):
        prepare_shards(str(stories), str(out), "byte", workers=1, show_progress=False)
    with stories.open("a") as f:
        f.write(json.dumps({"text": "one more story"}) + "\n")
    with pytest.raises(LmlabError, match="source that has changed since"):
        prepare_shards(str(stories), str(out), "char", workers=1, show_progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(LmlabError, match="is not a shard folder being prepared"):
        prepare_shards(str(stories), str(tmp_path / "full"), show_progress=False)


def test_bad_data_mid_stream_leaves_no_folder(stories, tmp_path):
    with stories.open("a") as f:
        f.write('{"text": broken}\n')
    out = tmp_path / "shards"
    with pytest.raises(LmlabError, match=r"stories.jsonl:301 is not JSON"):
        prepare_shards(str(stories), str(out), "byte", workers=2, shard_mb=SMALL,
                       show_progress=False)  # fmt: skip
    assert not out.exists()
    with pytest.raises(ParamError, match="workers=0"):
        prepare_shards(str(stories), str(out), workers=0)


def test_sharded_tokens_index_like_the_concatenation():
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 500, n).astype(np.uint16) for n in (7, 1, 30, 12)]
    joined, sharded = np.concatenate(parts), ShardedTokens(parts)
    index = rng.integers(0, len(joined), (5, 9))
    assert len(sharded) == 50 and sharded.dtype == np.uint16
    assert np.array_equal(sharded[index], joined[index])
    assert np.array_equal(sharded[3:45:4], joined[3:45:4])
    assert np.array_equal(sharded[np.array([-1, 0, 7, 8])], joined[[-1, 0, 7, 8]])
    assert np.array_equal(np.asarray(sharded), joined)
    with pytest.raises(IndexError):
        sharded[np.array([50])]


def test_the_first_shard_format_is_still_read(tmp_path):
    tok = train_tokenizer("byte", [])
    ids = np.frombuffer(b"an old shard folder " * 10, dtype=np.uint8).astype("<u2")
    ids.tofile(tmp_path / "train.bin")
    ids[:50].tofile(tmp_path / "val.bin")
    meta = {"format": 1, "dtype": "uint16", "vocab_size": 256, "train_tokens": 200,
            "val_tokens": 50, "train_bytes": 200, "val_bytes": 50}  # fmt: skip
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    tok.save(tmp_path / "tokenizer")
    data, loaded = read_shards(tmp_path)
    assert loaded == tok and np.array_equal(data.train, ids) and data.val_bytes == 50


def test_prepare_then_train_through_the_cli(stories, tmp_path, capsys):
    out = tmp_path / "shards"
    argv = ["prepare", str(stories), "--out", str(out), "--tokenizer", "char", "--quiet"]
    assert main(argv) == 0
    assert f"train on it with: lmlab train data.path={out}" in capsys.readouterr().out
    assert main(argv) == 0
    assert "shards, 1 reused" in capsys.readouterr().out
    runs = tmp_path / "runs"
    train = ["train", "--quiet", "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
             "data.seq_len=32", "train.batch_size=2", "train.max_steps=2", "train.max_time=0",
             "train.eval_batches=1", f"data.path={out}", f"out_dir={runs}", "name=r"]  # fmt: skip
    assert main(train) == 0
    assert (runs / "r" / "summary.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["kill -9", "Ctrl-C"])
def test_stopped_in_the_middle_then_the_same_command_finishes_like_a_clean_run(tmp_path, stop):
    source = tmp_path / "big.jsonl"
    line = json.dumps({"text": "a line of a long corpus, with some words in it " * 40}) + "\n"
    source.write_text("".join(line.replace("corpus", f"corpus {i}") for i in range(12_000)))
    argv = [str(source), "--tokenizer", "char", "--workers", "2", "--shard-mb", "0.2", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    killed = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, "-m", "lmlab", "prepare", *argv, "--out", str(killed)],
        env=env,
        start_new_session=True,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list((killed / "parts").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(child.pid, stop)
    _, err = child.communicate(timeout=120)
    if stop == signal.SIGINT:
        assert child.returncode == 130
        assert err.strip().splitlines()[-1] == "interrupted; run the same command again to continue"
    assert list((killed / "parts").glob("*.json")) and not (killed / "manifest.json").exists()
    assert main(["prepare", *argv, "--out", str(killed)]) == 0
    assert main(["prepare", *argv, "--out", str(tmp_path / "clean")]) == 0
    shards = [
        json.loads((f / "manifest.json").read_text())["shards"]
        for f in (killed, tmp_path / "clean")
    ]
    assert shards[0] == shards[1] and len(shards[0]) > 20


@pytest.mark.slow
def test_a_corpus_larger_than_the_process_memory_streams_through(tmp_path):
    """A 256 MB text file is prepared by a process whose peak resident memory stays far below
    the file's size: nothing holds the corpus whole."""
    source = tmp_path / "big.txt"
    block = "".join(f"line {i}: some text of a long book\n" for i in range(30_000)).encode()
    with source.open("wb") as f:
        while f.tell() < 256 << 20:
            f.write(block)
    script = (  # VmHWM, not ru_maxrss: that one keeps the forking parent's (pytest's) peak
        "import sys; from lmlab.data.prepare import prepare_shards; "
        "prepare_shards(sys.argv[1], sys.argv[2], 'byte', workers=1, show_progress=False); "
        "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, "-c", script, str(source), str(tmp_path / "shards")],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    peak_mb = int(done.stdout.split()[-1]) / 1024
    assert peak_mb < 160, peak_mb
    data, _ = read_shards(tmp_path / "shards")
    assert len(data.train) + len(data.val) == source.stat().st_size + len(SEPARATOR)

"""Reading the formats corpora ship in (JSONL, Parquet, saved ``datasets`` folders, files read by
``datasets.load_dataset``), and the segments that let workers read a source in parts."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer as HFTokenizer

from lmlab.config.schema import DataConfig
from lmlab.data.corpus import read_text_source
from lmlab.data.dataset import prepare_data
from lmlab.data.sources import Document, plan_segments, read_segment
from lmlab.data.tokenizers import tokenizer_state, train_tokenizer
from lmlab.errors import LmlabError

WORDS = "the quick brown fox jumps over the lazy dog\nand then\n  it rests, indented\n\nEND.\n"


def _jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_jsonl_is_one_document_per_line_named_by_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"text": "one\\r\\ntwo", "id": 1}\n\n{"body": "x", "text": "three"}\r\n'
        b'{"text": "   "}\n{"text": "four"}'
    )
    docs = read_text_source(path)
    assert docs == [Document("c.jsonl:1", "one\ntwo"), Document("c.jsonl:3", "three"),
                    Document("c.jsonl:5", "four")]  # fmt: skip


def test_text_field_picks_the_field_and_a_missing_one_names_the_line(tmp_path):
    path = tmp_path / "c.jsonl"
    _jsonl(path, [{"body": "alpha", "text": "a"}, {"body": "beta"}])
    with pytest.raises(LmlabError, match=r"c.jsonl:2 has no field 'text' \(it has: body\)"):
        read_text_source(path)
    assert [d.text for d in read_text_source(path, "body")] == ["alpha", "beta"]


def test_parquet_rows_are_documents_across_row_groups(tmp_path):
    path = tmp_path / "c.parquet"
    texts = [f"document {i} " * 20 for i in range(10)]
    pq.write_table(pa.table({"text": texts, "n": list(range(10))}), path, row_group_size=3)
    assert [d.text for d in read_text_source(path)] == texts
    assert read_text_source(path)[7].name == "c.parquet:7"
    segments = plan_segments(path, every=1)
    assert [(s.start, s.stop, s.first) for s in segments] == [(0, 1, 0), (1, 2, 3), (2, 3, 6),
                                                              (3, 4, 9)]  # fmt: skip
    assert [p.doc for s in segments for p in read_segment(s)] == [
        f"c.parquet:{i}" for i in range(10)
    ]
    with pytest.raises(LmlabError, match=r"has no column 'body' \(its columns: text, n\)"):
        read_text_source(path, "body")


def test_saved_datasets_folder_and_dataset_dict(tmp_path):
    import datasets

    train = datasets.Dataset.from_dict({"content": ["first text", "second text", "third"]})
    train.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": train, "test": train.select([0])}).save_to_disk(
        str(tmp_path / "dict")
    )
    docs = read_text_source(tmp_path / "one", "content")
    assert docs == [Document("one:0", "first text"), Document("one:1", "second text"),
                    Document("one:2", "third")]  # fmt: skip
    names = [d.name for d in read_text_source(tmp_path / "dict", "content")]
    assert names == ["dict:train:0", "dict:train:1", "dict:train:2", "dict:test:0"]
    with pytest.raises(LmlabError, match=r"no column 'text' \(its columns: content\)"):
        read_text_source(tmp_path / "one")


def test_csv_and_json_go_through_load_dataset_offline(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",1\nsecond row,0\n')
    (tmp_path / "b.json").write_text(json.dumps([{"text": "from json"}]))
    docs = read_text_source(tmp_path)
    assert docs == [Document("a.csv:0", "hello, world"), Document("a.csv:1", "second row"),
                    Document("b.json:0", "from json")]  # fmt: skip
    with pytest.raises(LmlabError, match=r"a.csv has no column 'body' \(its columns: text, label"):
        read_text_source(tmp_path / "a.csv", "body")


@pytest.mark.parametrize("name", ["HuggingFaceFW/fineweb", "hf:roneneldan/TinyStories"])
def test_a_hub_name_is_refused_without_downloading(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LmlabError, match=r"never downloads data sets.*save_to_disk"):
        read_text_source(name)
    (tmp_path / "data").mkdir()
    with pytest.raises(LmlabError, match=r"data/missing\.jsonl does not exist; give a text"):
        read_text_source("data/missing.jsonl")


def test_text_segments_reassemble_the_file_and_bpe_ids_do_not_change(tmp_path):
    path = tmp_path / "book.txt"
    text = "\ufeff" + (WORDS * 400).replace("\n", "\r\n", 7) + "é end"
    path.write_text(text, encoding="utf-8", newline="")
    whole = read_text_source(path)[0].text
    segments = plan_segments(path, every=700)
    assert len(segments) > 10 and all(s.kind == "text" for s in segments)
    pieces = [p for s in segments for p in read_segment(s, block=100)]
    assert "".join(p.text for p in pieces) == whole
    assert [p.ends for p in pieces].count(True) == 1 and pieces[-1].ends
    tok = train_tokenizer("bpe", [whole], 300)
    hf = HFTokenizer.from_str(tokenizer_state(tok)[1])
    joined = [i for p in pieces for i in hf.encode(p.text, add_special_tokens=False).ids]
    assert joined == hf.encode(whole, add_special_tokens=False).ids


def test_tail_segments_cut_one_text_at_a_line_start(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(WORDS * 100)
    segments = plan_segments(path, every=1000, tail=0.25)
    train = "".join(p.text for s in segments if s.side == "train" for p in read_segment(s))
    val = "".join(p.text for s in segments if s.side == "val" for p in read_segment(s))
    assert train + val == WORDS * 100
    assert 0.2 < len(val) / len(WORDS * 100) < 0.3 and val[0] not in " \n"


def test_jsonl_segments_number_lines_from_the_start_of_the_file(tmp_path):
    path = tmp_path / "c.jsonl"
    _jsonl(path, [{"text": f"line {i} " * 5} for i in range(200)])
    segments = plan_segments(path, every=500)
    assert len(segments) > 5
    docs = [p.doc for s in segments for p in read_segment(s)]
    assert docs == [f"c.jsonl:{i + 1}" for i in range(200)]
    with path.open("a") as f:
        f.write("{not json\n")
    last = plan_segments(path, every=500)[-1]
    with pytest.raises(LmlabError, match=r"c.jsonl:201 is not JSON"):
        list(read_segment(last))


def test_prepare_data_splits_jsonl_documents_by_document(tmp_path):
    path = tmp_path / "c.jsonl"
    _jsonl(path, [{"text": f"story {i}: " + "once upon a time " * 30} for i in range(20)])
    data, tok = prepare_data(DataConfig(path=str(path), tokenizer="byte", seq_len=16))
    docs = read_text_source(path)
    total = sum(len(d.text) for d in docs) + 2 * (len(docs) - 2)  # a separator inside each side
    assert data.train_bytes + data.val_bytes == total
    assert 0.05 < data.val_bytes / total < 0.15
    assert tok.decode(data.val).startswith("story ")

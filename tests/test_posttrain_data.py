"""Post-training data: special tokens in every tokenizer, the chat template, JSONL examples and
their one-line errors, the overlong policy, right padding that keeps examples apart for every
mixer, and the shipped data sets with their verifiers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.config.schema import ModelConfig
from lmlab.data.chat import CHAT_TEMPLATE_FILE, ChatTemplate
from lmlab.data.examples import read_examples, tokenize_examples
from lmlab.data.tokenizers import (
    load_tokenizer,
    tokenizer_from_state,
    tokenizer_state,
    train_tokenizer,
)
from lmlab.errors import LmlabError
from lmlab.layers.registry import import_builtin_layers, token_mixer_names
from lmlab.model.lm import LanguageModel
from lmlab.posttrain import datasets
from lmlab.posttrain.batches import IGNORE, epoch_indices, pad_examples
from lmlab.posttrain.verifiers import VERIFIERS, get_verifier, register_verifier

SPECIALS = ["<|user|>", "<|end|>"]
TEXT = "hello world, to be or not to be\n" * 20


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_special_tokens_are_one_id_each_after_the_base_vocabulary(kind, tmp_path):
    base = train_tokenizer(kind, [TEXT], vocab_size=300)
    tokenizer = base.with_special_tokens(SPECIALS)
    assert tokenizer.vocab_size == base.vocab_size + 2
    ids = tokenizer.encode("<|user|>to be<|end|>")
    assert ids[0] == base.vocab_size and ids[-1] == base.vocab_size + 1
    assert ids[1:-1] == base.encode("to be")
    assert tokenizer.decode(ids) == "<|user|>to be<|end|>"
    assert base.encode("<|user|>") != [base.vocab_size]  # the base has no such token
    tokenizer.save(tmp_path)
    assert load_tokenizer(tmp_path) == tokenizer != base
    assert tokenizer_from_state(*tokenizer_state(tokenizer)) == tokenizer
    assert tokenizer_state(base) == (kind, base._state())  # unchanged without specials


def test_chat_template_marks_assistant_text_as_trained_and_round_trips(tmp_path):
    template = ChatTemplate()
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    pieces = template.render(messages)
    assert [text for text, trained in pieces if trained] == ["4", "<|end|>\n"]
    assert template.prompt(messages[:2]).endswith("2+2?<|end|>\n<|assistant|>")
    template.save(tmp_path)
    assert json.loads((tmp_path / CHAT_TEMPLATE_FILE).read_text())["format"]
    assert ChatTemplate.load(tmp_path) == template
    (tmp_path / CHAT_TEMPLATE_FILE).write_text('{"format": "other"}')
    with pytest.raises(LmlabError, match="not a valid chat template"):
        ChatTemplate.load(tmp_path)


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = '{"prompt": "1+1=", "completion": "2"}'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "1+1=", "completion": ', ":2: not valid JSON"),
        ('["prompt"]', ":2: an example must be a JSON object, not list"),
        ('{"completion": "2"}', ":2: an instruction example needs field 'prompt'"),
        ('{"prompt": "1+1=", "completion": "  "}', ":2: field 'completion' is empty"),
        ('{"prompt": 5, "completion": "2"}', ":2: field 'prompt' must be a string, not int"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}', ":2: expected {prompt, completion}"),
        ('{"text": "x"}', ":2: expected {prompt, completion} or {messages}, found fields"),
        ('{"messages": []}', ":2: 'messages' must be a non-empty list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "has role 'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "must end with a non-empty assistant"),
    ],
)
def test_a_bad_line_is_one_error_naming_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "data.jsonl", GOOD, line)
    with pytest.raises(LmlabError) as error:
        read_examples(path, ("instruction", "chat"))
    text = str(error.value)
    assert "\n" not in text and text.startswith(str(path)) and message in text


def test_blank_lines_are_skipped_but_an_empty_file_is_an_error(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", GOOD, "", GOOD)
    assert [e.where for e in read_examples(path, ("instruction",))] == [
        f"{path}:1",
        f"{path}:3",
    ]
    with pytest.raises(LmlabError, match="holds no examples"):
        read_examples(write_lines(tmp_path / "empty.jsonl", ""), ("instruction",))
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(LmlabError, match=r"bad\.jsonl:1: not UTF-8"):
        read_examples(tmp_path / "bad.jsonl", ("instruction",))


def test_overlong_examples_truncate_the_prompt_drop_or_refuse(tmp_path):
    tokenizer = train_tokenizer("byte", ["x"])
    path = write_lines(
        tmp_path / "data.jsonl",
        '{"prompt": "abcdefgh", "completion": "12"}',  # 10 tokens
        '{"prompt": "ab", "completion": "123456789"}',  # completion alone does not fit
        '{"prompt": "a", "completion": "1"}',
    )
    examples = read_examples(path, ("instruction",))
    cut = tokenize_examples(examples, tokenizer, context=5, overlong="truncate")
    assert cut.stats() == {"examples": 2, "truncated": 1, "truncated_tokens": 4, "dropped": 1}
    assert tokenizer.decode(cut.ids[0]) == "efgh12"
    assert cut.trained[0].tolist() == [False] * 4 + [True] * 2
    assert cut.text_bytes == [2, 1]
    dropped = tokenize_examples(examples, tokenizer, context=5, overlong="drop")
    assert dropped.stats() == {"examples": 1, "truncated": 0, "truncated_tokens": 0, "dropped": 2}
    with pytest.raises(LmlabError, match=r"data.jsonl:1: 10 tokens do not fit the context of 6"):
        tokenize_examples(examples, tokenizer, context=5, overlong="refuse")
    with pytest.raises(LmlabError, match="no example fits"):
        tokenize_examples(examples[1:2], tokenizer, context=5, overlong="truncate")


def test_padding_labels_only_trained_tokens():
    ids = [np.array([5, 6, 7, 8]), np.array([1, 2])]
    trained = [np.array([False, False, True, True]), np.array([False, True])]
    batch = pad_examples(ids, trained)
    assert batch.inputs.tolist() == [[5, 6, 7], [1, 0, 0]]
    assert batch.labels.tolist() == [[IGNORE, 7, 8], [2, IGNORE, IGNORE]]
    assert batch.real_tokens == 4


def test_epoch_order_visits_every_example_once_per_epoch_and_is_reproducible():
    first = epoch_indices(10, seed=3, start=0, size=20)
    assert sorted(first[:10]) == list(range(10)) == sorted(first[10:])
    assert first[:10] != first[10:]
    assert epoch_indices(10, seed=3, start=7, size=5) == first[7:12]


import_builtin_layers()


@pytest.mark.parametrize("mixer", token_mixer_names())
def test_right_padding_keeps_examples_apart_for_every_mixer(mixer):
    """An example's logits in a batch with a longer example (so padded on the right) equal
    its logits alone: no mixer lets another example or the padding reach it."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, d_model=32, n_heads=2, n_layers=2, mixer=mixer)
    model = LanguageModel(cfg).eval()
    short = np.array([3, 1, 4, 1, 5, 9])
    long = np.array([2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5, 2, 3])
    masks = [np.ones(len(short), bool), np.ones(len(long), bool)]
    together = pad_examples([short, long], masks)
    alone = pad_examples([short], masks[:1])
    with torch.no_grad():
        batched = model(together.inputs)[0][0, : len(short) - 1]
        single = model(alone.inputs)[0][0]
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_shipped_sets_match_the_generator_and_keep_test_problems_out_of_training(tmp_path):
    datasets.generate_datasets(tmp_path)
    for name in datasets.SETS:
        for fmt in datasets.FORMATS:
            for split in datasets.SPLITS:
                file = datasets.file_name(name, fmt, split)
                shipped = datasets.shipped_path(name, fmt, split).read_text()
                assert shipped == (tmp_path / file).read_text(), file
        train = {
            e.fields["prompt"]
            for e in read_examples(datasets.shipped_path(name, "sft", "train"), ("instruction",))
        }
        test = {
            e.fields["prompt"]
            for e in read_examples(datasets.shipped_path(name, "sft", "test"), ("instruction",))
        }
        assert len(train) == 2000 and len(test) == 200 and not train & test


def test_shipped_answers_are_right_and_rejected_answers_wrong():
    for example in read_examples(datasets.shipped_path("addition", "rl", "test"), ("verifiable",)):
        a, b = example.fields["prompt"].rstrip("=").split("+")
        assert example.fields["answer"] == str(int(a) + int(b))
    for example in read_examples(
        datasets.shipped_path("copy_reverse", "preference", "test"), ("preference",)
    ):
        verb, word = example.fields["prompt"].rstrip(":").split(" ")
        assert example.fields["chosen"] == (word if verb == "copy" else word[::-1]) + "\n"
        assert exact(example.fields["rejected"], example.fields["chosen"]) == 0.0


def exact(completion: str, answer: str) -> float:
    return get_verifier("exact_match")(completion, answer)


def test_exact_match_verifier_and_user_registered_verifiers():
    assert exact("46\nand more", "46") == 1.0
    assert exact(" 46 ", "46\n") == 1.0
    assert exact("47", "46") == 0.0 and exact("", "46") == 0.0

    @register_verifier("contains")
    def contains(completion: str, answer: str) -> float:
        return float(answer in completion)

    try:
        assert get_verifier("contains")("it is 46.", "46") == 1.0
    finally:
        del VERIFIERS["contains"]
    with pytest.raises(LmlabError, match="unknown verifier 'contains'; available: "):
        get_verifier("contains")


def test_resolve_data_names_shipped_sets_and_refuses_missing_files(tmp_path):
    assert datasets.resolve_data("addition2", "sft").name == "addition2.sft.train.jsonl"
    with pytest.raises(LmlabError, match="neither a JSONL file nor a shipped data set"):
        datasets.resolve_data(str(tmp_path / "none.jsonl"), "sft")

"""``lmlab serve``: the OpenAI API through the official ``openai`` client, continuous batching
(a request's tokens do not depend on its batch), limits and auth (OpenAI-style 4xx), a client
that disconnects, and SIGTERM draining, on tiny attention and GLA runs.

Servers run in this process on a free loopback port (``serving_in_thread``), except the
SIGTERM test, which starts ``python -m lmlab serve`` and signals it. Every loop is bounded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import TINY_RUN

from lmlab.cli import main
from lmlab.config.schema import ModelConfig
from lmlab.data.chat import ChatTemplate as RolesTemplate
from lmlab.data.tokenizers import BpeTokenizer, train_tokenizer
from lmlab.memory.knn import KnnSettings
from lmlab.memory.store import build_store
from lmlab.model.generate import SamplingSettings, generate
from lmlab.model.lm import LanguageModel
from lmlab.serve.app import TextFrames
from lmlab.serve.batching import Batcher
from lmlab.serve.decoders import SpeculativeDecoder
from lmlab.serve.limits import Limits
from lmlab.serve.scheduler import (
    Choice,
    Decoder,
    Event,
    IncrementalText,
    Request,
    Sampler,
    Scheduler,
    first_stop,
    safe_end,
)
from lmlab.serve.server import open_service, serving_in_thread
from lmlab.train.run import load_trained_model

TINY = [*TINY_RUN, "train.max_steps=3", "train.eval_batches=1"]
FAMILIES = ["attention", "gla"]
ROUTED = "mod"
"""Attention under Mixture-of-Depths: its eval-mode state keeps a list of per-row states."""
TEMPLATE = (
    "{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m.role) }}{% endif %}"
    "{{ m.role | upper }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
PROMPTS = ["ROMEO:", "To be, or not", "O", "What light through yonder window breaks?"]
DEADLINE = 60.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny run per mixer family; the attention run has a chat template, GLA has none."""
    out = tmp_path_factory.mktemp("runs")
    for mixer in FAMILIES:
        argv = ["train", "--quiet", *TINY, f"model.mixer={mixer}", f"out_dir={out}"]
        assert main([*argv, f"name={mixer}"]) == 0
    assert (
        main(["train", "--quiet", *TINY, "model.mod_capacity=0.5", f"out_dir={out}", "name=mod"])
        == 0
    )
    (out / "attention" / "tokenizer" / "chat_template.jinja").write_text(TEMPLATE)
    return {name: out / name for name in [*FAMILIES, ROUTED]}


def client(base_url: str, api_key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=DEADLINE)


def expected(run: Path, prompt: str, tokens: int, temperature: float = 0.0, seed: int = 0) -> str:
    """What ``lmlab generate`` samples for ``prompt`` (the reference for the server)."""
    _, model, tokenizer, _ = load_trained_model(run)
    ids = torch.tensor([tokenizer.encode(prompt)])
    settings = SamplingSettings(temperature=temperature)
    out = generate(model, ids, tokens, settings, seed=seed)
    return tokenizer.decode(out[0, ids.shape[1] :].tolist())


@pytest.mark.parametrize("mixer", FAMILIES)
def test_completions_equal_lmlab_generate_streaming_or_not(runs, mixer, capfd):
    run = runs[mixer]
    with serving_in_thread(open_service(run)) as url:
        api = client(url)
        assert [m.id for m in api.models.list().data] == [mixer]
        greedy = api.completions.create(model=mixer, prompt="ROMEO:", max_tokens=24, temperature=0)
        assert greedy.choices[0].text == expected(run, "ROMEO:", 24)
        assert greedy.choices[0].finish_reason == "length"
        assert greedy.usage.prompt_tokens == len("ROMEO:")  # a character tokenizer
        assert greedy.usage.completion_tokens == 24
        assert greedy.usage.total_tokens == 30
        sampled = api.completions.create(
            model=mixer, prompt="ROMEO:", max_tokens=24, temperature=0.9, seed=7, n=3
        )
        texts = [c.text for c in sorted(sampled.choices, key=lambda c: c.index)]
        # choice i samples with seed + i: choice 0 is what `lmlab generate --seed 7` samples
        assert texts == [expected(run, "ROMEO:", 24, 0.9, 7 + i) for i in range(3)]
        assert sampled.usage.completion_tokens == 72
        one = api.completions.create(model=mixer, prompt="ROMEO:", max_tokens=1, n=2, seed=7)
        assert [c.text for c in one.choices] == [
            expected(run, "ROMEO:", 1, 1.0, 7 + i) for i in (0, 1)
        ]
        assert one.usage.completion_tokens == 2
        stream = api.completions.create(
            model=mixer,
            prompt="ROMEO:",
            max_tokens=24,
            temperature=0.9,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == texts[0]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 24
    assert "Traceback" not in capfd.readouterr().err  # nothing failed on the server's side


def test_chat_renders_the_runs_template_and_streams(runs):
    run = runs["attention"]
    messages = [
        {"role": "system", "content": "Speak verse."},
        {"role": "user", "content": "Who goes there?"},
    ]
    prompt = "SYSTEM: Speak verse.\nUSER: Who goes there?\nASSISTANT:"
    with serving_in_thread(open_service(run)) as url:
        api = client(url)
        reply = api.chat.completions.create(
            model="attention", messages=messages, max_tokens=16, temperature=0
        )
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content == expected(run, prompt, 16)
        assert reply.usage.prompt_tokens == len(prompt)
        chunks = list(
            api.chat.completions.create(
                model="attention", messages=messages, max_tokens=16, temperature=0, stream=True
            )
        )
        assert chunks[0].object == "chat.completion.chunk"
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == reply.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError, match="unknown role tool"):
            api.chat.completions.create(
                model="attention", messages=[{"role": "tool", "content": "x"}], max_tokens=4
            )


def test_chat_renders_a_fine_tuned_runs_own_template_first(runs, tmp_path):
    """A run fine-tuned on chats carries lmlab's role template (chat_template.json): the server
    asks for a reply exactly as training framed it, even beside a Jinja template."""
    run = tmp_path / "chat"
    shutil.copytree(runs["attention"], run)
    roles = {
        role: {"prefix": f"{role.upper()}: ", "suffix": "\n"}
        for role in ("system", "user", "assistant")
    }
    RolesTemplate(roles, special_tokens=[]).save(run / "tokenizer")
    (run / "tokenizer" / "chat_template.jinja").write_text("{{ raise_exception('not me') }}")
    messages = [{"role": "user", "content": "Who goes there?"}]
    with serving_in_thread(open_service(run)) as url:
        api = client(url)
        reply = api.chat.completions.create(
            model="chat", messages=messages, max_tokens=8, temperature=0
        )
        prompt = "USER: Who goes there?\nASSISTANT: "
        assert reply.choices[0].message.content == expected(run, prompt, 8)
        with pytest.raises(openai.BadRequestError, match="no role tool"):
            api.chat.completions.create(
                model="chat", messages=[{"role": "tool", "content": "x"}], max_tokens=4
            )


def test_chat_without_a_template_is_a_clear_400(runs):
    with (
        serving_in_thread(open_service(runs["gla"])) as url,
        pytest.raises(openai.BadRequestError) as caught,
    ):
        client(url).chat.completions.create(
            model="gla", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert caught.value.status_code == 400
    assert caught.value.body["code"] == "chat_template_missing"
    assert "chat_template.jinja" in caught.value.body["message"]


def test_stop_strings_end_the_text_before_the_stop(runs):
    run = runs["attention"]
    full = expected(run, "ROMEO:", 40)
    stop = full[10:12]
    with serving_in_thread(open_service(run)) as url:
        api = client(url)
        answer = api.completions.create(
            model="attention", prompt="ROMEO:", max_tokens=40, temperature=0, stop=[stop, "@@"]
        )
        streamed = api.completions.create(
            model="attention", prompt="ROMEO:", max_tokens=40, temperature=0, stop=stop, stream=True
        )
        pieces = list(streamed)
    assert answer.choices[0].text == full[: full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    assert "".join(p.choices[0].text for p in pieces) == full[: full.index(stop)]
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_stop_helpers_hold_back_what_may_begin_a_stop():
    assert first_stop("abcXYdef", ("XY",), 0) == 3
    assert first_stop("abcdef", ("XY",), 0) is None
    assert safe_end("abcX", ("XY",)) == 3
    assert safe_end("abcXZ", ("XY",)) == 5
    assert safe_end("ab\ufffd", ()) == 2
    assert safe_end("abc", ()) == 3


@pytest.mark.parametrize("kind", ["byte", "bpe", "char"])
def test_text_decoded_token_by_token_equals_decoding_every_token(kind):
    """Multi-byte characters split over tokens, invalid bytes and special tokens: after each
    token the incremental text is what decoding all the tokens gives."""
    sample = "h\u00e9llo w\u00f6rld \u2014 \u65e5\u672c\u8a9e \U0001f642, " * 4
    tokenizer = train_tokenizer(kind, [sample], vocab_size=300).with_special_tokens(["<|user|>"])
    generator = torch.Generator().manual_seed(0)
    ids = [*tokenizer.encode(sample), tokenizer.special_id("<|user|>")]
    ids += torch.randint(tokenizer.vocab_size, (200,), generator=generator).tolist()
    choice = Choice(0, Sampler(SamplingSettings(), generator))
    text = IncrementalText(tokenizer)
    for k, token in enumerate(ids, 1):
        choice.ids.append(token)
        assert text(choice) == tokenizer.decode(ids[:k])
    assert choice.settled_ids > len(ids) - 4  # the settled text kept up


def test_a_tokenizer_that_rewrites_when_decoding_is_decoded_whole():
    """SentencePiece's decoder turns the word marker into a space except at the start, so one
    token alone decodes differently than in context: such a tokenizer (an imported model's) is
    decoded whole, and the streamed text still equals decoding every token."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    sample = "to be or not to be, that is the question " * 8
    hf.train_from_iterator([sample], trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"]))
    tokenizer = BpeTokenizer(hf)
    ids = list(tokenizer.encode(sample))
    assert not tokenizer.decodes_piecewise
    assert "".join(tokenizer.decode([i]) for i in ids) != tokenizer.decode(ids)
    choice = Choice(0, Sampler(SamplingSettings(), torch.Generator()))
    text = IncrementalText(tokenizer)
    for k, token in enumerate(ids, 1):
        choice.ids.append(token)
        assert text(choice) == tokenizer.decode(ids[:k])


def test_text_frames_are_the_whole_chunk_serialised():
    def frame(index: int, text: str) -> str:
        chunk = {"id": "cmpl-1", "object": "text_completion", "model": "attention"}
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": None}
        return f"data: {json.dumps(chunk | {'choices': [choice]})}\n\n"

    frames = TextFrames(frame)
    texts = ["a", 'say "hi"\\n', "\n\t\x00\x1f", "h\u00e9 \u65e5 \U0001f642 \ud800", "", "</s>"]
    for index in (0, 3, 0):
        for text in texts:
            assert frames(index, text) == frame(index, text)


class Collector:
    """The events of one scheduler request, gathered thread-safely."""

    def __init__(self) -> None:
        self.texts: dict[int, str] = {}
        self.done = threading.Event()
        self.finished = 0
        self.n = 1

    def __call__(self, event: Event) -> None:
        if event.kind == "text":
            self.texts[event.index] = self.texts.get(event.index, "") + event.text
        elif event.kind == "finish":
            self.finished += 1
            if self.finished == self.n:
                self.done.set()


@pytest.mark.parametrize("mixer", [*FAMILIES, ROUTED])
def test_a_request_decodes_the_same_in_a_batch_as_alone(runs, mixer):
    """Greedy requests of different lengths, two joining while the others run and a long
    prompt prefilled in chunks, each equal ``lmlab generate`` on it alone, while they decode in
    shared forwards (attention caches of different lengths padded and masked, recurrent states
    stacked), or in forwards of their own (Mixture-of-Depths)."""
    run = runs[mixer]
    _, model, tokenizer, _ = load_trained_model(run)
    scheduler = Scheduler(model, tokenizer, max_batch=8, prefill_chunk=16)
    first = [("ROMEO:", 30), ("JULIET", 25), (PROMPTS[1], 12), (PROMPTS[3], 18)]
    later = [("O", 22), ("ROMEO:", 30)]
    sinks = {}
    greedy = SamplingSettings(temperature=0.0)

    def submit(prompt: str, tokens: int) -> None:
        sinks[prompt, tokens, len(sinks)] = sink = Collector()
        scheduler.submit(Request(tokenizer.encode(prompt), greedy, tokens, sink))

    for prompt, tokens in first:
        submit(prompt, tokens)
    scheduler.start()
    try:
        assert wait_for(lambda: scheduler.steps >= 3)
        for prompt, tokens in later:
            submit(prompt, tokens)
        for sink in sinks.values():
            assert sink.done.wait(DEADLINE)
    finally:
        scheduler.stop(DEADLINE)
    for (prompt, tokens, _), sink in sinks.items():
        assert sink.texts[0] == expected(run, prompt, tokens), prompt
    if mixer == ROUTED:  # its rows cannot be stacked: each request decodes on its own
        assert not scheduler.batcher.enabled and scheduler.widest_decode == 1
    else:  # the first four overlap for at least 12 steps, whatever their (different) lengths
        assert scheduler.batcher.enabled and scheduler.widest_decode >= 4


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(runs):
    """While a 200-token prompt is prefilled 16 tokens per iteration, a running stream gets a
    token at every iteration: the stall per token is one chunk, not the whole prompt."""
    _, model, tokenizer, _ = load_trained_model(runs["attention"])
    scheduler = Scheduler(model, tokenizer, max_batch=4, prefill_chunk=16)
    running, long = Collector(), Collector()
    greedy = SamplingSettings(temperature=0.0)
    tokens_at_first_long_token: list[int] = []

    def on_long(event: Event) -> None:
        if not tokens_at_first_long_token:
            tokens_at_first_long_token.append(len(running.texts.get(0, "")))
        long(event)

    scheduler.submit(Request(tokenizer.encode("ROMEO:"), greedy, 100, running))
    scheduler.start()
    try:
        assert wait_for(lambda: scheduler.steps >= 2)
        before = len(running.texts.get(0, ""))
        scheduler.submit(Request(tokenizer.encode("ab" * 100), greedy, 5, on_long))
        assert long.done.wait(DEADLINE) and running.done.wait(DEADLINE)
    finally:
        scheduler.stop(DEADLINE)
    # 200 / 16 = 13 iterations of prefill, each followed by a decode step of the running row
    assert tokens_at_first_long_token[0] - before >= 12
    assert long.texts[0] == expected(runs["attention"], "ab" * 100, 5)


def test_a_hybrid_models_states_stack_layer_by_layer():
    """Attention + GLA + MLA layers: the attention cache pads and masks, the GLA state
    concatenates, and MLA's cache (no ``stack_states``) makes rows of different lengths
    unstackable, while rows of one length stack and decode as they do alone."""
    config = ModelConfig(
        d_model=32, n_layers=3, n_heads=2, pattern=["attention", "gla", "mla"], vocab_size=20
    )
    torch.manual_seed(0)
    model = LanguageModel(config).eval()
    batcher = Batcher(model, 20)
    assert batcher.enabled and batcher.ragged == [True, False, False]
    prompts = [torch.randint(0, 20, (1, length)) for length in (5, 5, 8)]
    with torch.inference_mode():
        states = [model(prompt)[1] for prompt in prompts]
        assert batcher.key(states[0]) == batcher.key(states[1]) != batcher.key(states[2])
        two_layers = dataclasses.replace(config, n_layers=2, pattern=["attention", "gla"])
        plain = LanguageModel(two_layers).eval()
        plain_batcher = Batcher(plain, 20)
        plain_states = [plain(prompt)[1] for prompt in prompts]
        assert len({plain_batcher.key(state) for state in plain_states}) == 1
        for net, chosen, stacker in (
            (model, states[:2], batcher),
            (plain, plain_states, plain_batcher),
        ):
            tokens = torch.randint(0, 20, (len(chosen), 6))
            batch = stacker.stack(chosen)
            alone = list(chosen)
            for t in range(6):
                logits, batch = net(tokens[:, t : t + 1], batch)
                for row in range(len(chosen)):
                    single, alone[row] = net(tokens[row : row + 1, t : t + 1], alone[row])
                    torch.testing.assert_close(logits[row], single[0], atol=1e-5, rtol=1e-5)


def test_concurrent_streams_through_http_equal_alone(runs):
    run = runs["gla"]
    results: dict[int, str] = {}

    def ask(i: int, url: str) -> None:
        stream = client(url).completions.create(
            model="gla", prompt=PROMPTS[i % 4], max_tokens=20, temperature=0, stream=True
        )
        results[i] = "".join(c.choices[0].text for c in stream)

    service = open_service(run)
    with serving_in_thread(service) as url:
        threads = [threading.Thread(target=ask, args=(i, url)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE)
    assert {i: results.get(i) for i in range(8)} == {
        i: expected(run, PROMPTS[i % 4], 20) for i in range(8)
    }
    assert service.scheduler.widest_decode >= 2


class FailsOnce(Decoder):
    """A plugged-in decoder whose first decode step raises (a bug, as the server sees it)."""

    def __init__(self, model: LanguageModel) -> None:
        super().__init__(model)
        self.failed = False

    def step(self, last, state, samplers):
        if not self.failed:
            self.failed = True
            raise RuntimeError("boom")
        return super().step(last, state, samplers)


def test_a_decoder_that_fails_answers_500_and_the_server_goes_on(runs, capfd):
    with serving_in_thread(open_service(runs["gla"], decoder=FailsOnce)) as url:
        with pytest.raises(openai.InternalServerError) as caught:
            client(url).completions.create(model="gla", prompt="a", max_tokens=5)
        assert caught.value.body["message"] == "internal error while generating"
        assert "Traceback" not in str(caught.value.body)
        reply = client(url).completions.create(model="gla", prompt="a", max_tokens=5)
        assert reply.usage.completion_tokens == 5
    assert "RuntimeError: boom" in capfd.readouterr().err  # the server's log has the traceback


@pytest.fixture(scope="module")
def other_run(runs: dict[str, Path]) -> Path:
    """A run with another tokenizer (bytes) and hidden size beside the tiny runs: neither a
    draft nor a store of it fits them."""
    out = runs["attention"].parent
    argv = ["train", "--quiet", *TINY, "model.d_model=16", "data.tokenizer=byte"]
    assert main([*argv, f"out_dir={out}", "name=other"]) == 0
    return out / "other"


@pytest.mark.parametrize(
    ("mixer", "draft", "confidence"), [("attention", "self", 0.0), ("gla", "self:1", 0.5)]
)
def test_a_speculative_server_completes_what_plain_decoding_does(
    runs, mixer, draft, confidence, capfd
):
    """Greedy speculative decoding (the run or its first layer as draft, drafting every round
    or stopping after an unsure draft) is plain greedy decoding; every row decodes on its own,
    n choices included."""
    run = runs[mixer]
    spec = str(run) if draft == "self" else draft
    service = open_service(run, draft=spec, draft_tokens=3, draft_confidence=confidence)
    decoder = service.scheduler.decoder
    assert isinstance(decoder, SpeculativeDecoder) and not service.scheduler.batcher.enabled
    assert decoder.draft_confidence == confidence
    with serving_in_thread(service) as url:
        api = client(url)
        for prompt in PROMPTS[:2]:
            reply = api.completions.create(model=mixer, prompt=prompt, max_tokens=20, temperature=0)
            assert reply.choices[0].text == expected(run, prompt, 20)
            assert reply.usage.completion_tokens == 20
        two = api.completions.create(model=mixer, prompt="O", max_tokens=9, temperature=0, n=2)
        assert [c.text for c in two.choices] == [expected(run, "O", 9)] * 2
        sampled = api.completions.create(
            model=mixer, prompt="O", max_tokens=12, temperature=0.9, seed=3, stream=True
        )
        assert len("".join(c.choices[0].text for c in sampled if c.choices)) >= 1
    assert decoder.stats.drafted > 0 and decoder.stats.emitted > decoder.stats.rounds
    if draft == "self":  # the run drafting for itself: greedy drafts are always accepted
        assert decoder.stats.accepted == decoder.stats.drafted
    assert "Traceback" not in capfd.readouterr().err


def test_a_draft_with_another_tokenizer_is_one_error_at_start_up(runs, other_run, capsys):
    code = main(["serve", str(runs["attention"]), "--draft", str(other_run), "--port", "0"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: the draft run") and "another tokenizer" in err[0]


@pytest.fixture(scope="module")
def store(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("store") / "store"
    build_store(runs["attention"], folder, max_tokens=3000, show_progress=False)
    return folder


def test_a_server_with_memory_completes_what_generate_memory_does(runs, store, capsys):
    """The kNN-LM mixture in the server's every token: greedy completions equal
    ``lmlab generate --memory`` (a lambda high enough that the store changes the text)."""
    run = runs["attention"]
    knn = ["--knn-lambda", "0.8", "--knn-k", "8", "--knn-temperature", "2"]
    for prompt in PROMPTS[:2]:
        argv = ["generate", str(run), "--prompt", prompt, "--temperature", "0"]
        assert main([*argv, "--max-new-tokens", "24", "--memory", str(store), *knn]) == 0
        with_memory = capsys.readouterr().out[len(prompt) : -1]
        assert with_memory != expected(run, prompt, 24)  # the store is really read
        settings = KnnSettings(knn_lambda=0.8, knn_k=8, knn_temperature=2.0)
        with serving_in_thread(open_service(run, memory=store, knn=settings)) as url:
            api = client(url)
            reply = api.completions.create(
                model="attention", prompt=prompt, max_tokens=24, temperature=0
            )
            assert reply.choices[0].text == with_memory
            both = api.completions.create(
                model="attention", prompt=prompt, max_tokens=24, temperature=0, n=2
            )
            assert [c.text for c in both.choices] == [with_memory] * 2


def test_a_store_of_another_run_is_one_error_at_start_up(runs, other_run, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    build_store(other_run, foreign, max_tokens=500, show_progress=False)
    capsys.readouterr()
    code = main(["serve", str(runs["attention"]), "--memory", str(foreign), "--port", "0"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: store {foreign}") and "lmlab memory build" in err[0]


def test_api_key_turns_on_bearer_auth(runs):
    with serving_in_thread(open_service(runs["gla"], api_key="s3cret")) as url:
        with pytest.raises(openai.AuthenticationError) as caught:
            client(url, api_key="wrong").models.list()
        assert caught.value.status_code == 401
        assert caught.value.body["code"] == "invalid_api_key"
        plain = httpx.post(f"{url}/completions", json={"model": "gla", "prompt": "a"})
        assert plain.status_code == 401
        assert client(url, api_key="s3cret").models.list().data[0].id == "gla"
        assert httpx.get(url.removesuffix("/v1") + "/health").json()["status"] == "ok"


LIMITS = Limits(max_tokens=100_000, max_prompt_tokens=40, max_concurrent=1, max_body_bytes=2000)
BAD_BODIES = [
    (413, None, "x" * 3000),
    (400, None, "{not json"),
    (400, None, "[1, 2]"),
    (400, "prompt", {"prompt": "x" * 41}),
    (400, "prompt", {"prompt": ""}),
    (400, "prompt", {"prompt": 5}),
    (400, "max_tokens", {"prompt": "a", "max_tokens": 100_001}),
    (400, "max_tokens", {"prompt": "a", "max_tokens": 0}),
    (400, "temperature", {"prompt": "a", "temperature": -1}),
    (400, "top_p", {"prompt": "a", "top_p": 0}),
    (400, "n", {"prompt": "a", "n": 9}),
    (400, "stop", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}),
    (400, "seed", {"prompt": "a", "seed": -1}),
    (400, "logprobs", {"prompt": "a", "logprobs": 2}),
    (400, "model", {"prompt": "a", "model": None}),
    (404, "model", {"prompt": "a", "model": "gpt-4"}),
]


def test_limits_and_bad_input_are_openai_style_4xx(runs):
    service = open_service(runs["gla"], max_batch=8, limits=LIMITS)
    with serving_in_thread(service) as url:
        for status, param, body in BAD_BODIES:
            if isinstance(body, dict):
                body = json.dumps({"model": "gla"} | body)
            response = httpx.post(f"{url}/completions", content=body, timeout=DEADLINE)
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["param"] == param, (body, error)
            assert "Traceback" not in response.text
        # concurrency: one stream holds the only slot, the next request gets 429
        with httpx.stream(
            "POST",
            f"{url}/completions",
            json={"model": "gla", "prompt": "a", "max_tokens": 100_000, "stream": True},
            timeout=DEADLINE,
        ) as held:
            lines = held.iter_lines()  # kept: dropping the iterator would close the stream
            assert next(lines).startswith("data: ")
            busy = httpx.post(f"{url}/completions", json={"model": "gla", "prompt": "a"})
            assert busy.status_code == 429
            assert busy.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                client(url).completions.create(model="gla", prompt="a", max_tokens=2)
        assert wait_for(lambda: service.in_flight == 0)
        assert client(url).completions.create(model="gla", prompt="a", max_tokens=2).choices
        service.draining = True  # as after SIGTERM, for requests on kept-alive connections
        refused = httpx.post(f"{url}/completions", json={"model": "gla", "prompt": "a"})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error"
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 503


def wait_for(condition, timeout: float = DEADLINE) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("mixer", FAMILIES)
def test_a_client_that_disconnects_mid_stream_frees_its_slot(runs, mixer):
    limits = Limits(max_tokens=100_000, max_concurrent=1)
    service = open_service(runs[mixer], limits=limits)
    body = {"model": mixer, "prompt": "ROMEO:", "max_tokens": 100_000, "stream": True}
    with serving_in_thread(service) as url:
        with httpx.stream("POST", f"{url}/completions", json=body, timeout=DEADLINE) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            assert service.scheduler.active_rows() == 1
        assert wait_for(lambda: service.scheduler.active_rows() == 0 and service.in_flight == 0)
        steps = service.scheduler.steps
        time.sleep(0.2)
        assert service.scheduler.steps == steps  # nothing decodes for nobody
        reply = client(url).completions.create(model=mixer, prompt="a", max_tokens=3)
        assert reply.usage.completion_tokens == 3


def test_sigterm_lets_the_running_stream_finish_then_exits(runs):
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    server = subprocess.Popen(
        [sys.executable, "-m", "lmlab", "serve", str(runs["gla"]), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        banner = server.stderr.readline()
        assert banner.startswith("serving gla on http://127.0.0.1:"), banner
        url = banner.split()[3]
        body = {"model": "gla", "prompt": "ROMEO:", "max_tokens": 300, "stream": True}
        lines = []
        with httpx.stream("POST", f"{url}/completions", json=body, timeout=DEADLINE) as stream:
            for line in stream.iter_lines():
                if line and not lines:
                    server.send_signal(signal.SIGTERM)
                lines.append(line)
        # uvicorn re-raises the signal once drained, so the exit status says SIGTERM
        assert server.wait(DEADLINE) == -signal.SIGTERM
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    events = [line.removeprefix("data: ") for line in lines if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len("".join(c["choices"][0]["text"] for c in chunks)) == 300
    with pytest.raises(httpx.ConnectError):
        httpx.get(url.removesuffix("/v1") + "/health")

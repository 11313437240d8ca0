"""lmlab's continuous-batching scheduler: one thread owns the model and, between decode steps,
lets requests join (prefilled a bounded chunk at a time) and leave the running batch.

Why hand-written: the serving stacks that schedule continuous batches (vLLM, TGI, llama.cpp)
each own a model format and their own kernels; none drives an arbitrary PyTorch module whose
per-layer state is whatever its mixer carries. The HTTP side uses FastAPI and uvicorn as
libraries; this module is only the loop between them and the model.

Each iteration of the loop:

1. admits queued requests while the running rows stay within ``max_batch``;
2. prefills waiting prompts, at most ``prefill_chunk`` prompt tokens in all per iteration
   (prompts of equal length that start together go through in one forward), so a long prompt
   delays the running streams by one chunk's forward per token they produce, never by its
   whole prefill;
3. decodes one step of every running group (rows whose states stack, see ``batching.py``) in
   one forward each, samples each row with its own settings and generator, and drops the rows
   that finished, were cancelled (a disconnected client) or failed.

The decode step is a :class:`Decoder`: another decoder (e.g. speculative decoding, several
tokens per step) plugs in without touching the loop.
"""

from __future__ import annotations

import functools
import queue
import sys
import threading
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmlab.data.tokenizers import Tokenizer
from lmlab.model.cache import ModelState
from lmlab.model.generate import SamplingSettings, sample_next
from lmlab.model.lm import LanguageModel
from lmlab.serve.batching import Batcher, repeat, select, signature, stack_equal


@dataclass(frozen=True)
class Event:
    """What the scheduler tells a request's owner: ``kind`` is ``"text"`` (new ``text`` of
    choice ``index``), ``"finish"`` (choice ``index`` ended for ``reason``: ``"stop"`` or
    ``"length"``, after ``tokens`` tokens) or ``"error"`` (the whole request failed)."""

    kind: str
    index: int = 0
    text: str = ""
    reason: str = ""
    tokens: int = 0


@dataclass
class Sampler:
    """One choice's sampling: lmlab's settings and its own seeded generator, so a choice's
    tokens do not depend on which other requests share its batch."""

    settings: SamplingSettings
    generator: torch.Generator

    def sample(self, logits: torch.Tensor) -> int:
        """A token id from the logits ``[V]`` of one row's last position (sampled on the CPU,
        where the generator lives, whatever the model's device)."""
        return int(sample_next(logits[None].float().cpu(), self.settings, self.generator))


@dataclass
class Choice:
    """One completion of a request (``n`` choices share the prompt's prefill)."""

    index: int
    sampler: Sampler
    ids: list[int] = field(default_factory=list)
    sent: int = 0
    """Characters of the decoded text already emitted."""
    finished: bool = False
    settled: str = ""
    """The text of ``ids[:settled_ids]``, which later tokens cannot change (see
    :class:`IncrementalText`)."""
    settled_ids: int = 0


@dataclass
class Request:
    """A prompt, its choices and where their events go. ``emit`` is called from the scheduler
    thread and must be thread-safe; setting ``cancelled`` (any thread) frees the rows."""

    prompt: list[int]
    settings: SamplingSettings
    max_tokens: int
    emit: Callable[[Event], None]
    n: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)
    choices: list[Choice] = field(default_factory=list)
    prefilled: int = 0
    state: ModelState | None = None

    def __post_init__(self) -> None:
        # Choice i draws from seed + i: choice 0 samples what ``lmlab generate --seed`` does.
        self.choices = [
            Choice(i, Sampler(self.settings, torch.Generator().manual_seed(self.seed + i)))
            for i in range(self.n)
        ]


@dataclass
class Row:
    request: Request
    choice: Choice


@dataclass
class Group:
    """Rows decoded in one forward: their states stacked along the batch dimension."""

    rows: list[Row]
    state: ModelState


class Decoder:
    """How the scheduler turns model calls into tokens. ``prefill`` consumes prompt tokens;
    ``step`` takes each row's last token and returns the new tokens of every row (one each
    here; a speculative decoder may return several) and the advanced state. Tokens a row gets
    past its stop or length are discarded."""

    batched = True
    """False for a decoder whose rows cannot share forwards (speculative decoding: each row
    accepts a different number of tokens): every choice then decodes in a group of its own."""

    def __init__(self, model: LanguageModel) -> None:
        self.model = model

    def prefill(
        self, ids: torch.Tensor, state: ModelState | None
    ) -> tuple[torch.Tensor, ModelState]:
        """Logits of the last position ``[B, V]`` and the state after ``ids [B, T]``."""
        logits, state = self.model(ids, state)
        return logits[:, -1], state

    def step(
        self, last: torch.Tensor, state: ModelState, samplers: list[Sampler]
    ) -> tuple[list[list[int]], ModelState]:
        logits, state = self.model(last, state)
        rows = logits[:, -1]
        return [[sampler.sample(rows[i])] for i, sampler in enumerate(samplers)], state


class Scheduler:
    """The loop that owns the model (see the module docstring). ``submit`` from any thread;
    ``start``, then ``stop`` (which drains: running and queued requests finish first)."""

    def __init__(
        self,
        model: LanguageModel,
        tokenizer: Tokenizer,
        max_batch: int = 32,
        prefill_chunk: int = 256,
        decoder: Decoder | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.decoder = decoder or Decoder(model)
        self.device = next(model.parameters()).device
        self.batcher = Batcher(model, tokenizer.vocab_size)
        self.text = IncrementalText(tokenizer)
        self.batcher.enabled = self.batcher.enabled and self.decoder.batched
        self._queue: queue.Queue[Request] = queue.Queue()
        self._waiting: list[Request] = []
        self._prefilling: list[Request] = []
        self._groups: list[Group] = []
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lmlab-scheduler", daemon=True)
        self.steps = 0
        """Decode steps so far (tests and benchmarks read it)."""
        self.widest_decode = 0
        """The most rows decoded in one forward so far."""

    # ---- the public side ----
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> None:
        self._queue.put(request)
        self._wake.set()

    def cancel(self, request: Request) -> None:
        request.cancelled.set()
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every submitted request, then end the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def active_rows(self) -> int:
        """Rows holding a slot: running and prefilling (read from another thread: a snapshot)."""
        running = sum(len(group.rows) for group in self._groups)
        return running + sum(request.n for request in self._prefilling)

    # ---- the loop ----
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                self._wake.wait()
                self._wake.clear()
                while self._busy():
                    try:
                        self._iterate()
                    except Exception:  # a bug: fail what is running, keep serving the rest
                        traceback.print_exc(file=sys.stderr)
                        self._fail_everything()
                if self._stopping and self._queue.empty():
                    return

    def _busy(self) -> bool:
        return bool(self._groups or self._prefilling or self._waiting or not self._queue.empty())

    def _iterate(self) -> None:
        while not self._queue.empty():
            self._waiting.append(self._queue.get_nowait())
        self._drop_cancelled()
        self._admit()
        self._prefill()
        self._decode()
        self._merge_groups()

    def _drop_cancelled(self) -> None:
        self._waiting = [r for r in self._waiting if not r.cancelled.is_set()]
        self._prefilling = [r for r in self._prefilling if not r.cancelled.is_set()]
        for group in self._groups:
            if any(row.request.cancelled.is_set() for row in group.rows):
                self._keep(group, [not row.request.cancelled.is_set() for row in group.rows])
        self._groups = [group for group in self._groups if group.rows]

    def _admit(self) -> None:
        while self._waiting and self.active_rows() + self._waiting[0].n <= self.max_batch:
            self._prefilling.append(self._waiting.pop(0))

    def _prefill(self) -> None:
        """Up to ``prefill_chunk`` prompt tokens of the waiting prompts, oldest first; chunks
        of equal length whose states stack run as one forward."""
        budget = self.prefill_chunk
        batches: dict[object, list[tuple[Request, int]]] = defaultdict(list)
        for request in self._prefilling:
            if budget <= 0:
                break
            size = min(len(request.prompt) - request.prefilled, budget)
            budget -= size
            key = (size, None if request.state is None else signature(request.state.layers))
            batches[key if self.batcher.enabled else id(request)].append((request, size))
        for members in batches.values():
            size = members[0][1]
            ids = torch.tensor(
                [r.prompt[r.prefilled : r.prefilled + size] for r, _ in members], device=self.device
            )
            states = [r.state for r, _ in members]
            state = None if states[0] is None else stack_equal(states)
            logits, state = self.decoder.prefill(ids, state)
            for row, (request, _) in enumerate(members):
                request.prefilled += size
                request.state = select(state, [row]) if len(members) > 1 else state
                if request.prefilled == len(request.prompt):
                    self._start(request, logits[row])

    def _start(self, request: Request, logits: torch.Tensor) -> None:
        """A prompt is prefilled: sample each choice's first token and join the running rows."""
        self._prefilling.remove(request)
        rows = [Row(request, choice) for choice in request.choices]
        if self.decoder.batched:
            state = repeat(request.state, request.n) if request.n > 1 else request.state
            groups = [Group(rows, state)]
        else:  # a forward never changes the state it is given, so the choices share it
            groups = [Group([row], request.state) for row in rows]
        request.state = None
        for group in groups:
            self._accept(group, [[row.choice.sampler.sample(logits)] for row in group.rows])
            if group.rows:  # a one-token request (or a stop at once) is already done
                self._groups.append(group)

    def _decode(self) -> None:
        for group in list(self._groups):
            last = torch.tensor([[row.choice.ids[-1]] for row in group.rows], device=self.device)
            samplers = [row.choice.sampler for row in group.rows]
            new, group.state = self.decoder.step(last, group.state, samplers)
            self.widest_decode = max(self.widest_decode, len(group.rows))
            self._accept(group, new)
        self.steps += 1
        self._groups = [group for group in self._groups if group.rows]

    def _accept(self, group: Group, new: list[list[int]]) -> None:
        """Append each row's new tokens, emit their text, and drop the rows that finished."""
        for row, tokens in zip(group.rows, new, strict=True):
            for token in tokens:
                if self._append(row.request, row.choice, token):
                    break
        self._keep(group, [not row.choice.finished for row in group.rows])

    def _append(self, request: Request, choice: Choice, token: int) -> bool:
        """Add one token to a choice; True when the choice has finished."""
        choice.ids.append(token)
        text = self.text(choice)
        reason = ""
        cut = first_stop(text, request.stop, choice.sent)
        if cut is not None:
            text, reason = text[:cut], "stop"
        elif len(choice.ids) >= request.max_tokens:
            reason = "length"
        # Hold back an incomplete character (byte-level BPE) and a possible start of a stop.
        end = len(text) if reason else safe_end(text, request.stop)
        if end > choice.sent:
            request.emit(Event("text", choice.index, text=text[choice.sent : end]))
            choice.sent = end
        if reason:
            choice.finished = True
            request.emit(Event("finish", choice.index, reason=reason, tokens=len(choice.ids)))
        return choice.finished

    def _keep(self, group: Group, keep: list[bool]) -> None:
        if all(keep):
            return
        rows = [i for i, kept in enumerate(keep) if kept]
        group.rows = [group.rows[i] for i in rows]
        if rows:
            group.state = select(group.state, rows)

    def _merge_groups(self) -> None:
        """Groups whose states stack (``batching.Batcher``: attention caches of any lengths,
        recurrent states of one shape) become one, up to ``max_batch`` rows; each new group's
        state is built in one stacking (one copy of its rows' states)."""
        if not self.batcher.enabled or len(self._groups) < 2:
            return
        by_key: dict[object, list[Group]] = defaultdict(list)
        for group in self._groups:
            by_key[self.batcher.key(group.state)].append(group)
        merged = []
        for groups in by_key.values():
            bins: list[list[Group]] = []
            for group in groups:
                if bins and sum(len(g.rows) for g in bins[-1]) + len(group.rows) <= self.max_batch:
                    bins[-1].append(group)
                else:
                    bins.append([group])
            for members in bins:
                if len(members) == 1:
                    merged.append(members[0])
                    continue
                state = self.batcher.stack([group.state for group in members])
                merged.append(Group([row for group in members for row in group.rows], state))
        self._groups = merged

    def _fail_everything(self) -> None:
        requests = {id(r): r for r in self._waiting + self._prefilling}
        for group in self._groups:
            requests.update({id(row.request): row.request for row in group.rows})
        for request in requests.values():
            request.emit(Event("error", text="internal error while generating"))
        self._waiting, self._prefilling, self._groups = [], [], []


class IncrementalText:
    """A choice's decoded text, token by token, at a cost that does not grow with its length.

    Decoding every token at each step (what the scheduler did before) costs a time growing
    with the length; this decodes only the tokens since the text last ended on a whole
    character, and a single token from a cache of each id's text. It gives the same text for
    tokenizers that decode piecewise (``Tokenizer.decodes_piecewise``: characters, bytes and
    byte-level BPE decode left to right, so text cut after a whole character never changes when
    tokens follow, while a trailing replacement character may be half of one and waits for the
    next token); any other tokenizer (an imported SentencePiece one) decodes the whole reply."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.piece = functools.lru_cache(maxsize=None)(lambda token: tokenizer.decode([token]))

    def __call__(self, choice: Choice) -> str:
        """The text of all of ``choice.ids`` (advancing the choice's settled text)."""
        if not self.tokenizer.decodes_piecewise:
            return self.tokenizer.decode(choice.ids)
        tail_ids = choice.ids[choice.settled_ids :]
        tail = self.piece(tail_ids[0]) if len(tail_ids) == 1 else self.tokenizer.decode(tail_ids)
        text = choice.settled + tail
        if not tail.endswith("\ufffd"):
            choice.settled, choice.settled_ids = text, len(choice.ids)
        return text


def first_stop(text: str, stops: tuple[str, ...], sent: int) -> int | None:
    """Where the earliest stop string starts in ``text``, looking only where a new one can be
    (from the emitted part on, less the longest stop); None when there is none."""
    if not stops:
        return None
    start = max(0, sent - max(len(stop) for stop in stops) + 1)
    found = [i for i in (text.find(stop, start) for stop in stops) if i >= 0]
    return min(found) if found else None


def safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be emitted now: not a trailing replacement character (half a
    UTF-8 character that the next token completes) nor a suffix that may begin a stop string."""
    end = len(text)
    while len(text) - end < 3 and end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, end), hold, -1):
            if text[end - size : end] == stop[:size]:
                hold = size
                break
    return end - hold

"""The OpenAI-compatible HTTP API over the scheduler (FastAPI on uvicorn).

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream=true``: server-sent events in OpenAI's chunk format,
ending with ``data: [DONE]``). Every failure is OpenAI-style JSON (``protocol.ApiError``), never
a traceback. The event loop only parses, checks and forwards: the model runs on the
scheduler's thread, whose events come back through a :class:`Call`'s queue.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lmlab.data.tokenizers import Tokenizer
from lmlab.errors import ParamError
from lmlab.model.generate import SamplingSettings
from lmlab.serve.chat import CHAT_TEMPLATE_FILE, ChatTemplate
from lmlab.serve.limits import Limits
from lmlab.serve.protocol import (
    MAX_SEED,
    ApiError,
    ChatRequest,
    CompletionRequest,
    Sampling,
    parse_body,
)
from lmlab.serve.scheduler import Event, Scheduler
from lmlab.serve.scheduler import Request as Job

COMPLETION_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for ``/v1/completions``; chat defaults to the server's limit."""


@dataclass
class Service:
    """Everything the routes need: the served model's name, its tokenizer and chat template,
    the scheduler that runs it, the limits and the optional API key."""

    name: str
    tokenizer: Tokenizer
    scheduler: Scheduler
    chat_template: ChatTemplate | None = None
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    draining: bool = False
    in_flight: int = 0
    created: int = field(default_factory=lambda: int(time.time()))


class Call:
    """One HTTP call's requests to the scheduler (one per prompt) and the queue their events
    arrive on as ``(prompt index, event)``: the scheduler thread hands them over through
    ``loop.call_soon_threadsafe``, so the queue is only touched on the event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.jobs: list[Job] = []

    def emitter(self, index: int) -> Callable[[Event], None]:
        """The ``emit`` of prompt ``index``'s request (called on the scheduler's thread)."""

        def emit(event: Event) -> None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, event))

        return emit

    async def updates(self) -> AsyncIterator[tuple[int, Event]]:
        """Every event until each choice of each prompt has finished (or one failed)."""
        open_choices = sum(job.n for job in self.jobs)
        while open_choices:
            index, event = await self.events.get()
            if event.kind == "error":
                raise ApiError(500, event.text, kind="server_error")
            open_choices -= event.kind == "finish"
            yield index, event


class CallStream(StreamingResponse):
    """An event stream that runs ``on_close`` however it ends (finished, the client gone, or
    never started), so a slot is always given back."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class TextFrames:
    """Server-sent event frames of text chunks, per token the hottest path of a stream: the
    frame of a choice index is built once by ``frame(index, text)`` around a placeholder
    text, and each chunk then only JSON-encodes its own text into it (one C call) instead of
    serialising the whole chunk. Byte for byte what ``frame`` gives (tested)."""

    PLACEHOLDER = "\x00"
    """A text no envelope field holds (the id is hex, the model a folder name)."""

    def __init__(self, frame: Callable[[int, str], str]) -> None:
        self.frame = frame
        self.parts: dict[int, tuple[str, str]] = {}

    def __call__(self, index: int, text: str) -> str:
        parts = self.parts.get(index)
        if parts is None:
            mark = json.dumps(self.PLACEHOLDER)
            before, _, after = self.frame(index, self.PLACEHOLDER).partition(mark)
            parts = self.parts[index] = (before, after)
        return parts[0] + json.dumps(text) + parts[1]


def error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def read_json(request: Request, limit: int) -> object:
    """The body as JSON, refusing one over ``limit`` bytes before reading it all."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from None


def check_api_key(service: Service, request: Request) -> None:
    if service.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        token.strip().encode(), service.api_key.encode()
    ):
        raise ApiError(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            kind="authentication_error",
        )


def sampling_settings(body: Sampling) -> SamplingSettings:
    settings = SamplingSettings(body.temperature, body.top_k, body.top_p, body.min_p)
    try:
        settings.validate()
    except ParamError as exc:
        raise ApiError(400, str(exc), exc.params[0] if exc.params else None) from None
    return settings


def encode_prompt(service: Service, text: str, where: str) -> list[int]:
    """The token ids of ``text`` (``where`` names it: ``prompt[2]``, ``messages``)."""
    ids = service.tokenizer.encode(text)
    param = where.partition("[")[0]
    if not ids:
        raise ApiError(
            400, f"{where} is empty after tokenisation; give at least one character", param
        )
    if len(ids) > service.limits.max_prompt_tokens:
        raise ApiError(
            400,
            f"{where} has {len(ids)} tokens, over this server's limit of "
            f"{service.limits.max_prompt_tokens} (--max-prompt-tokens)",
            param,
            code="context_length_exceeded",
        )
    return ids


def max_new_tokens(service: Service, asked: int | None, default: int) -> int:
    if asked is not None and asked > service.limits.max_tokens:
        raise ApiError(
            400,
            f"max_tokens={asked} is over this server's limit of {service.limits.max_tokens} "
            "(--max-tokens-limit)",
            "max_tokens",
        )
    return asked or min(default, service.limits.max_tokens)


class Completion:
    """One completions or chat call, from the parsed body to the JSON or event stream."""

    def __init__(self, service: Service, body: Sampling, prompts: list[list[int]], chat: bool):
        self.service, self.body, self.prompts, self.chat = service, body, prompts, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())
        default = service.limits.max_tokens if chat else COMPLETION_DEFAULT_MAX_TOKENS
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        self.max_tokens = max_new_tokens(service, asked, default)
        self.settings = sampling_settings(body)
        self.stops = body.stops()
        if body.n * len(prompts) > service.scheduler.max_batch:
            raise ApiError(
                400,
                f"n x prompts = {body.n * len(prompts)} is over this server's batch of "
                f"{service.scheduler.max_batch} (--max-batch)",
                "n",
            )
        self.seed = secrets.randbelow(MAX_SEED) if body.seed is None else body.seed

    def submit(self) -> Call:
        call = Call()
        call.jobs = [
            Job(
                prompt,
                self.settings,
                self.max_tokens,
                call.emitter(index),
                n=self.body.n,
                seed=self.seed,
                stop=self.stops,
            )
            for index, prompt in enumerate(self.prompts)
        ]
        for job in call.jobs:
            self.service.scheduler.submit(job)
        return call

    def choice_index(self, prompt_index: int, event: Event) -> int:
        return prompt_index * self.body.n + event.index

    def usage(self, completion_tokens: int) -> dict[str, int]:
        prompt_tokens = sum(len(prompt) for prompt in self.prompts)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def envelope(self, choices: list[dict], **extra: Any) -> dict[str, Any]:
        chunk = extra.pop("chunk", False)
        kind = self.object + (".chunk" if self.chat and chunk else "")
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.service.name,
            "choices": choices,
            **extra,
        }

    async def respond(self, call: Call) -> dict[str, Any]:
        """The whole answer once every choice has finished."""
        count = self.body.n * len(self.prompts)
        texts, reasons, tokens = [""] * count, [None] * count, 0
        async for prompt_index, event in call.updates():
            index = self.choice_index(prompt_index, event)
            if event.kind == "text":
                texts[index] += event.text
            else:
                reasons[index], tokens = event.reason, tokens + event.tokens
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": reason,
                }
                for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
            ]
        else:
            choices = [
                {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
            ]
        return self.envelope(choices, usage=self.usage(tokens))

    def chunk_choice(self, index: int, text: str | None, reason: str | None) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        delta = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}

    async def stream(self, call: Call) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece of text, one with each finish reason, the
        usage when asked for (``stream_options.include_usage``), then ``[DONE]``."""
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)

        def sse(choices: list[dict], **extra: Any) -> str:
            return f"data: {json.dumps(self.envelope(choices, chunk=True, **extra))}\n\n"

        text_frame = TextFrames(lambda index, text: sse([self.chunk_choice(index, text, None)]))

        if self.chat:
            roles = [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                | {"finish_reason": None}
                for i in range(self.body.n * len(self.prompts))
            ]
            yield sse(roles)
        tokens = 0
        try:
            async for prompt_index, event in call.updates():
                index = self.choice_index(prompt_index, event)
                if event.kind == "text":
                    yield text_frame(index, event.text)
                else:
                    tokens += event.tokens
                    yield sse([self.chunk_choice(index, None, event.reason)])
        except ApiError as error:
            yield f"data: {json.dumps(error.body())}\n\n"
            return
        if include_usage:
            yield sse([], usage=self.usage(tokens))
        yield "data: [DONE]\n\n"


async def run_call(service: Service, request: Request, completion: Completion):
    """Take a slot, submit, and answer as JSON or as an event stream. However the call ends
    its rows are cancelled (a no-op once finished) and the slot given back: a client that goes
    away mid-stream is noticed at the next write, a plain call is watched while it waits."""
    service.in_flight += 1
    call = completion.submit()

    def close() -> None:
        for job in call.jobs:
            service.scheduler.cancel(job)
        service.in_flight -= 1

    if completion.body.stream:
        return CallStream(completion.stream(call), close)
    try:
        answer = asyncio.ensure_future(completion.respond(call))
        while not answer.done():
            await asyncio.wait({answer}, timeout=0.25)
            if not answer.done() and await request.is_disconnected():
                answer.cancel()
                return JSONResponse({}, status_code=499)  # nobody reads it
        return JSONResponse(answer.result())
    finally:
        close()


async def admit(service: Service, request: Request, parse: Callable[[object], Completion]):
    """Auth, drain, the concurrency limit and the body, in that order; then the call."""
    check_api_key(service, request)
    if service.draining:
        raise ApiError(503, "the server is shutting down", kind="server_error")
    if service.in_flight >= service.limits.max_concurrent:
        raise ApiError(
            429,
            f"this server already runs {service.in_flight} requests (--max-concurrent); "
            "retry later",
            code="too_many_requests",
            kind="rate_limit_error",
        )
    completion = parse(await read_json(request, service.limits.max_body_bytes))
    completion.body.refuse_unsupported()
    if completion.body.model != service.name:
        raise ApiError(
            404,
            f"model {completion.body.model!r} is not served here; this server serves "
            f"{service.name!r}",
            "model",
            code="model_not_found",
        )
    return await run_call(service, request, completion)


def create_app(service: Service) -> FastAPI:
    """The FastAPI application; its lifespan starts the scheduler and, on shutdown (after
    uvicorn has let the open requests finish), stops it."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.scheduler.start()
        try:
            yield
        finally:
            service.draining = True
            await asyncio.to_thread(service.scheduler.stop)

    app = FastAPI(title="lmlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(error.status_code, str(error.detail), kind=kind))

    @app.exception_handler(Exception)
    async def bug(_: Request, error: Exception) -> JSONResponse:
        traceback.print_exception(error, file=sys.stderr)
        return error_response(ApiError(500, "internal server error", kind="server_error"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        if service.draining:
            raise ApiError(503, "the server is shutting down", kind="server_error")
        return {"status": "ok", "model": service.name, "running": service.in_flight}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_api_key(service, request)
        entry = {"id": service.name, "object": "model", "created": service.created}
        return {"object": "list", "data": [entry | {"owned_by": "lmlab"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        def parse(raw: object) -> Completion:
            body = parse_body(CompletionRequest, raw)
            prompts = [
                encode_prompt(service, text, "prompt" if i == 0 else f"prompt[{i}]")
                for i, text in enumerate(body.prompts())
            ]
            return Completion(service, body, prompts, chat=False)

        return await admit(service, request, parse)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        def parse(raw: object) -> Completion:
            body = parse_body(ChatRequest, raw)
            if service.chat_template is None:
                raise ApiError(
                    400,
                    f"model {service.name!r} has no chat template (its run's tokenizer/"
                    f"{CHAT_TEMPLATE_FILE}); use /v1/completions, or add a template "
                    "(see docs/serving.md)",
                    "messages",
                    code="chat_template_missing",
                )
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            try:
                text = service.chat_template.render(messages)
            except ValueError as exc:
                raise ApiError(400, str(exc), "messages") from None
            return Completion(service, body, [encode_prompt(service, text, "messages")], True)

        return await admit(service, request, parse)

    return app

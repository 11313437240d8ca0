"""``lmlab serve``: load a run, start the scheduler and the HTTP server, drain on SIGTERM."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from lmlab.errors import LmlabError, ParamError
from lmlab.memory.knn import KnnSettings
from lmlab.serve.limits import Limits
from lmlab.train.run import TOKENIZER_DIR, load_trained_model, open_run

if TYPE_CHECKING:
    import uvicorn

    from lmlab.serve.app import Service
    from lmlab.serve.scheduler import Decoder

API_KEY_ENV = "LMLAB_API_KEY"
"""Where ``serve`` reads the API key when ``--api-key`` is not given."""


def open_service(
    run: str | Path,
    device: str = "auto",
    max_batch: int = 32,
    prefill_chunk: int = 256,
    limits: Limits | None = None,
    api_key: str | None = None,
    decoder: Callable[..., Decoder] | None = None,
    draft: str | None = None,
    draft_tokens: int = 4,
    draft_confidence: float = 0.0,
    memory: str | Path | None = None,
    knn: KnnSettings | None = None,
) -> Service:
    """The run's model, tokenizer and chat template behind a (not yet started) scheduler;
    ``decoder(model)`` replaces the plain one-token decode step. ``draft`` (a run folder with
    the same tokenizer, or ``self:N``) decodes speculatively, ``draft_tokens`` per round (fewer
    after a token the draft gives less than ``draft_confidence``);
    ``memory`` (a store from ``lmlab memory build`` of this run) mixes its kNN distribution,
    read with ``knn``, into every next-token distribution. Both are checked here, before the
    server listens."""
    from lmlab.memory.knn import knn_hook
    from lmlab.memory.store import open_store
    from lmlab.serve.app import Service
    from lmlab.serve.chat import load_chat_template
    from lmlab.serve.decoders import HookDecoder, SpeculativeDecoder
    from lmlab.serve.scheduler import Scheduler
    from lmlab.train.device import pick_device
    from lmlab.train.run import load_draft

    for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk)):
        if value < 1:
            raise ParamError(f"<{name}>={value} must be at least 1", name)
    limits = limits or Limits()
    for name in ("max_tokens", "max_prompt_tokens", "max_concurrent", "max_body_bytes"):
        if getattr(limits, name) < 1:
            param = "max_tokens_limit" if name == "max_tokens" else name
            raise ParamError(f"<{param}>={getattr(limits, name)} must be at least 1", param)
    if api_key is not None and not api_key.strip():
        raise ParamError("<api_key> is empty; give a key or leave it out", "api_key")
    if draft is not None and memory is not None:
        raise ParamError(
            "<draft> and <memory> do not combine yet; give one of them", "draft", "memory"
        )
    if decoder is not None and (draft is not None or memory is not None):
        raise ParamError(
            "<decoder> is the decode step; it replaces <draft> and <memory>",
            "decoder",
            "draft",
            "memory",
        )
    if knn is not None and memory is None:
        raise ParamError("<knn> settings need a <memory> store", "memory")
    knn = knn or KnnSettings()
    knn.validate()
    run_dir, _ = open_run(run)
    _, model, tokenizer, _ = load_trained_model(run_dir, pick_device(device))
    if draft is not None:
        target_device = next(model.parameters()).device
        drafter = load_draft(draft, model, tokenizer, target_device)
        chosen: Decoder | None = SpeculativeDecoder(model, drafter, draft_tokens, draft_confidence)
    elif memory is not None:
        store = open_store(memory)
        store.check_model(model.cfg.d_model, tokenizer, run_dir)
        chosen = HookDecoder(model, knn_hook(store, knn))
    else:
        chosen = decoder(model) if decoder else None
    scheduler = Scheduler(
        model, tokenizer, max_batch=max_batch, prefill_chunk=prefill_chunk, decoder=chosen
    )
    template = load_chat_template(run_dir / TOKENIZER_DIR)
    return Service(run_dir.name, tokenizer, scheduler, template, limits, api_key)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), or a one-line error."""
    if not 0 <= port <= 65535:
        raise ParamError(f"<port>={port} must be in 0..65535 (0: any free port)", "port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise LmlabError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(service: Service, sock: socket.socket) -> uvicorn.Server:
    """A uvicorn server for ``service``, to run on ``sock``. On SIGTERM or Ctrl-C uvicorn
    stops accepting connections and waits for the open ones (running streams finish); the
    service refuses new requests on kept-alive connections (503) from that moment."""
    import uvicorn

    from lmlab.serve.app import create_app

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            service.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        create_app(service),
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_keep_alive=5,
    )
    return DrainingServer(config)


@contextmanager
def serving_in_thread(service: Service, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``service`` from a background thread of this process (tests, benchmarks) and
    yield its base URL (``http://host:port/v1``); on exit it drains and stops like SIGTERM."""
    sock = bind(host, port)
    server = make_server(service, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server thread ended before it started")
            time.sleep(0.01)
        yield base_url(sock)
    finally:
        service.draining = True
        server.should_exit = True
        thread.join(60)
        sock.close()


def base_url(sock: socket.socket) -> str:
    """``http://host:port/v1`` of a listening socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(
    run: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 32,
    max_tokens_limit: int = Limits.max_tokens,
    max_prompt_tokens: int = Limits.max_prompt_tokens,
    max_concurrent: int = Limits.max_concurrent,
    max_body_bytes: int = Limits.max_body_bytes,
    prefill_chunk: int = 256,
    device: str = "auto",
    draft: str | None = None,
    draft_tokens: int = 4,
    draft_confidence: float = 0.0,
    memory: str | Path | None = None,
    knn: KnnSettings | None = None,
) -> None:
    """Serve ``run`` until SIGTERM or Ctrl-C, which drain the running requests first.
    ``api_key`` (else ``$LMLAB_API_KEY``) turns on bearer-token auth; ``draft`` and
    ``memory`` as in :func:`open_service`."""
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    limits = Limits(max_tokens_limit, max_prompt_tokens, max_concurrent, max_body_bytes)
    sock = bind(host, port)
    try:
        service = open_service(
            run,
            device,
            max_batch,
            prefill_chunk,
            limits,
            api_key,
            draft=draft,
            draft_tokens=draft_tokens,
            draft_confidence=draft_confidence,
            memory=memory,
            knn=knn,
        )
        print(
            f"serving {service.name} on {base_url(sock)} "
            f"(batch {max_batch}, auth {'on' if api_key else 'off'}, "
            f"batching {'stacked' if service.scheduler.batcher.enabled else 'per request'}"
            + (f", draft {draft} ({draft_tokens} tokens per round)" if draft else "")
            + (f", memory {memory}" if memory else "")
            + ")",
            file=sys.stderr,
            flush=True,
        )
        if not is_loopback(host) and not api_key:
            print(
                f"warning: listening on {host} without --api-key: anyone who can reach this "
                "port can use the model",
                file=sys.stderr,
                flush=True,
            )
        make_server(service, sock).run(sockets=[sock])
    finally:
        sock.close()

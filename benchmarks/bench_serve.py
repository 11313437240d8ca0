"""Load test of ``lmlab serve`` on loopback, and its overhead against ``lmlab generate``.

For each mixer family (attention, and GLA as the recurrent one) at the ``gpt-tiny`` preset's
size, a run is trained for ONE step (so its weights are in effect random: decode speed does
not depend on them) and served by ``python -m lmlab serve`` in a child process. Then:

1. one streaming client alone: tokens/s, time to first token (TTFT), inter-token latency (ITL);
2. ``--clients`` concurrent streaming clients (prompts of different lengths), each making
   ``--requests`` requests of ``--tokens`` tokens: errors, complete streams, aggregate tokens/s
   and its ratio to the lone stream's, p50/p99 TTFT and ITL;
3. the server's overhead at batch 1: greedy tokens/s of one request (a 51-character prompt,
   ``--decode-tokens`` tokens, timed from sending it to ``[DONE]``) through the server, against
   ``lmlab generate``'s path (``stream_tokens`` in a worker process, same threads, timed over
   its prefill and tokens) and against the scheduler driven in that worker without HTTP (and,
   with ``--baseline-src``, through a server run from another checkout's ``src``). One request
   per path back to back is a turn, ``--decode-repeats`` turns per round, in a rotating order;
   the overhead is the median over turns of each turn's ratio to ``generate``, so a busy
   neighbour falls on both sides of each ratio alike. Each side's CPU time per token is
   reported too (the server process's from Linux's ``/proc``, the worker's from
   ``time.process_time``): unlike wall time it hardly moves with the machine's load. The
   client of this phase reads lines and parses only the usage chunk, so that its own work (on
   the same cores) weighs as little as possible on the server; the load phases' clients parse
   every chunk with ``json`` (both use ``httpx``; the tests use the official ``openai``
   client). (Timing from the first token to the last instead misleads on a busy machine: a
   client descheduled at the first token then reads the rest in one burst.)

The load phases run in turns for ``--rounds`` rounds (tokens/s: the median round; latencies:
percentiles over every round). Everything is bounded: a fixed number of requests, and
``--max-seconds`` per phase. One command prints both tables:

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_serve.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from timing import machine, print_table

from lmlab.cli import main as lmlab_main
from lmlab.model.generate import SamplingSettings, stream_tokens
from lmlab.serve.scheduler import Event, Request, Scheduler
from lmlab.train.run import load_trained_model

LINES = [
    "ROMEO:",
    "But, soft! what light through yonder window breaks?",
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?",
    "To be, or not to be, that is the question:",
    "Now is the winter of our discontent",
    "Friends, Romans, countrymen, lend me your ears;",
    "All the world's a stage,\nAnd all the men and women merely players;",
    "HAMLET:",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def train_run(folder: Path, mixer: str) -> Path:
    """The gpt-tiny preset with ``mixer``, trained one step (weights in effect random)."""
    argv = ["train", "--quiet", "--preset", "gpt-tiny", f"model.mixer={mixer}"]
    argv += ["train.max_steps=1", "train.max_time=0", "train.eval_batches=1"]
    with contextlib.redirect_stdout(sys.stderr):
        assert lmlab_main([*argv, f"out_dir={folder}", f"name={mixer}"]) == 0
    return folder / mixer


def child_env(threads: int, src: Path | None = None) -> dict[str, str]:
    """A child's environment: ``threads`` torch threads, lmlab from ``src`` (else this
    checkout's)."""
    src = src or Path(__file__).resolve().parents[1] / "src"
    return os.environ | {"PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}


class Server:
    """``python -m lmlab serve RUN --port 0`` in a child process (lmlab from ``src``, else
    this checkout's), stopped with SIGTERM."""

    def __init__(self, run: Path, threads: int, max_batch: int, src: Path | None = None) -> None:
        command = [sys.executable, "-m", "lmlab", "serve", str(run), "--port", "0"]
        command += ["--max-batch", str(max_batch), "--max-tokens-limit", "4096"]
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, text=True, env=child_env(threads, src)
        )
        banner = self.process.stderr.readline()
        if not banner.startswith("serving "):
            raise RuntimeError(f"the server did not start: {banner}")
        self.url = banner.split()[3]
        self.model = run.name

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


async def one_stream(
    http: httpx.AsyncClient, server: Server, prompt: str, tokens: int, temperature: float = 0.8
) -> dict:
    """One streaming request: when its pieces of text arrived, its token count (the usage
    chunk) and whether it completed (all ``tokens``, finish reason ``length``, ``[DONE]``).
    Read as raw server-sent events: the clients share the server's two cores, so they parse
    as little as they can (the tests use the ``openai`` client)."""
    body = {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    arrivals: list[float] = []
    finish, used, done = None, 0, False
    async with http.stream("POST", f"{server.url}/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk["choices"]:
                if choice["text"]:
                    arrivals.append(time.perf_counter())
                finish = choice["finish_reason"] or finish
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
    return {
        "ttft": arrivals[0] - start if arrivals else float("nan"),
        "gaps": [b - a for a, b in itertools.pairwise(arrivals)],
        "tokens": used,
        "complete": done and finish == "length" and used == tokens,
    }


async def load(server: Server, clients: int, requests: int, tokens: int, limit: float) -> dict:
    """``clients`` concurrent clients, each making ``requests`` streaming requests in turn."""
    results: list[dict] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=limit, limits=limits) as http:

        async def client(i: int) -> None:
            for r in range(requests):
                try:
                    prompt = LINES[(i + r) % len(LINES)]
                    results.append(await one_stream(http, server, prompt, tokens))
                except Exception as exc:  # counted and reported, never hidden
                    errors.append(f"{type(exc).__name__}: {exc}")

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(clients))), limit)
        wall = time.perf_counter() - start
    return {
        "requests": clients * requests,
        "errors": errors,
        "complete": sum(result["complete"] for result in results),
        "tokens_per_s": sum(result["tokens"] for result in results) / wall,
        "ttfts": [result["ttft"] for result in results],
        "gaps": [gap for result in results for gap in result["gaps"]],
    }


def pooled(rounds: list[dict]) -> dict:
    """One load phase over several rounds: counts summed, tokens/s the median round's,
    latency percentiles over every request and gap of every round."""
    ttfts = [ttft for result in rounds for ttft in result["ttfts"]]
    gaps = [gap for result in rounds for gap in result["gaps"]]
    errors = [error for result in rounds for error in result["errors"]]
    return {
        "requests": sum(result["requests"] for result in rounds),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "complete": sum(result["complete"] for result in rounds),
        "tokens_per_s": statistics.median(result["tokens_per_s"] for result in rounds),
        "ttft_p50": percentile(ttfts, 0.5),
        "ttft_p99": percentile(ttfts, 0.99),
        "itl_p50": percentile(gaps, 0.5),
        "itl_p99": percentile(gaps, 0.99),
    }


@dataclass
class Timed:
    """One batch-1 request: its tokens, wall seconds and the CPU seconds of the process that
    decoded it (server or worker)."""

    tokens: int
    wall: float
    cpu: float


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, every thread (Linux ``/proc``;
    NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def light_stream(http: httpx.AsyncClient, server: Server, tokens: int) -> int:
    """One greedy streaming request read as lines: only the usage chunk is parsed (the
    overhead phase's client does as little as it can on the server's cores). Its completion
    tokens; raises unless it ended with ``[DONE]``."""
    body = {
        "model": server.model,
        "prompt": LINES[1],
        "max_tokens": tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage = ""
    async with http.stream("POST", f"{server.url}/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                return json.loads(usage.removeprefix("data: "))["usage"]["completion_tokens"]
            if line.startswith('data: {"error"'):
                raise RuntimeError(line)
            if '"usage"' in line:
                usage = line
    raise RuntimeError("the stream ended without [DONE]")


def decode_server(server: Server, tokens: int) -> Timed:
    """One batch-1 request through the server, from sending it to ``[DONE]``."""

    async def run() -> Timed:
        async with httpx.AsyncClient(timeout=300) as http:
            cpu = process_cpu_seconds(server.process.pid)
            start = time.perf_counter()
            count = await light_stream(http, server, tokens)
            wall = time.perf_counter() - start
            return Timed(count, wall, process_cpu_seconds(server.process.pid) - cpu)

    return asyncio.run(run())


def generate_worker(run: str) -> None:
    """``--generate-worker RUN``: load the run, then for each line ``PATH N`` on stdin decode
    one greedy ``N``-token request and print its tokens, wall seconds (over its prefill and
    tokens) and CPU seconds: through ``lmlab generate``'s path (``stream_tokens``) when PATH is
    ``generate``, or through the scheduler driven in this process, without HTTP, when it is
    ``scheduler``. A process of its own, idle between requests like the server, so the OS
    treats both sides alike."""
    _, model, tokenizer, _ = load_trained_model(run)
    ids = tokenizer.encode(LINES[1])
    greedy = SamplingSettings(temperature=0.0)
    scheduler = Scheduler(model, tokenizer)
    scheduler.start()
    for line in sys.stdin:
        path, tokens = line.split()
        cpu, start = time.process_time(), time.perf_counter()
        if path == "generate":
            count = sum(1 for _ in stream_tokens(model, torch.tensor([ids]), int(tokens), greedy))
        else:
            done = threading.Event()

            def finished(event: Event, done: threading.Event = done) -> None:
                if event.kind == "finish":
                    done.set()

            scheduler.submit(Request(ids, greedy, int(tokens), finished))
            done.wait()
            count = int(tokens)
        print(count, time.perf_counter() - start, time.process_time() - cpu, flush=True)
    scheduler.stop()


class GenerateWorker:
    def __init__(self, run: Path, threads: int) -> None:
        command = [sys.executable, __file__, "--generate-worker", str(run)]
        command += ["--threads", str(threads)]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(threads),
        )

    def decode(self, path: str, tokens: int) -> Timed:
        self.process.stdin.write(f"{path} {tokens}\n")
        self.process.stdin.flush()
        count, wall, cpu = self.process.stdout.readline().split()
        return Timed(int(count), float(wall), float(cpu))

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(60)


BATCH1_PATHS = {
    "generate": "lmlab generate",
    "scheduler": "scheduler, no HTTP",
    "served": "lmlab serve",
    "baseline": "lmlab serve, --baseline-src",
}
"""The batch-1 paths (``lmlab generate``'s, the scheduler without HTTP, the server, the
server of another checkout when asked for) and their labels in the table."""


def batch1_round(
    servers: dict[str, Server], worker: GenerateWorker, tokens: int, turn: int
) -> dict[str, Timed]:
    """One request on each batch-1 path, back to back, the order rotated by ``turn`` (so no
    path always runs first after the load phases, or right after another)."""
    paths = [path for path in BATCH1_PATHS if path in servers or path in ("generate", "scheduler")]
    order = paths[turn % len(paths) :] + paths[: turn % len(paths)]
    return {
        path: decode_server(servers[path], tokens)
        if path in servers
        else worker.decode(path, tokens)
        for path in order
    }


def batch1_rows(mixer: str, turns: list[dict[str, Timed]]) -> list[list[object]]:
    """The overhead table's rows: per path, the median tokens/s, the median over rounds of
    the tokens/s lost against ``generate`` in the same round (with the range), and the CPU
    time per token over all its requests against ``generate``'s."""
    rows = []
    base_rates = [t["generate"].tokens / t["generate"].wall for t in turns]
    cpu_base = sum(t["generate"].cpu for t in turns) / sum(t["generate"].tokens for t in turns)
    for path, label in BATCH1_PATHS.items():
        if path not in turns[0]:
            continue
        rates = [t[path].tokens / t[path].wall for t in turns]
        losses = [1 - rate / base for rate, base in zip(rates, base_rates, strict=True)]
        cpu = sum(t[path].cpu for t in turns) / sum(t[path].tokens for t in turns)
        rows.append(
            [
                mixer,
                label,
                f"{statistics.median(rates):.0f}",
                "" if path == "generate" else f"{100 * statistics.median(losses):.1f}%",
                ""
                if path == "generate"
                else f"{100 * min(losses):.0f} to {100 * max(losses):.0f}%",
                f"{1e6 * cpu:.0f}",
                "" if path == "generate" else f"{100 * (cpu / cpu_base - 1):+.1f}%",
            ]
        )
    return rows


def bench_family(
    args: argparse.Namespace, folder: Path, mixer: str
) -> tuple[list[list[object]], list[list[object]]]:
    """The load table's rows and the batch-1 table's rows of one mixer family."""
    run = train_run(folder, mixer)
    server = Server(run, args.threads, args.clients)
    servers = {"served": server}
    if args.baseline_src:
        servers["baseline"] = Server(run, args.threads, args.clients, args.baseline_src)
    worker = GenerateWorker(run, args.threads)
    lone_rounds, many_rounds, turns = [], [], []
    try:
        asyncio.run(load(server, 1, 1, 8, args.max_seconds))  # warm-up, not reported
        batch1_round(servers, worker, 8, 0)
        for _ in range(args.rounds):  # in turns, so a busy neighbour hits every phase alike
            lone_rounds.append(
                asyncio.run(load(server, 1, args.requests, args.tokens, args.max_seconds))
            )
            many_rounds.append(
                asyncio.run(
                    load(server, args.clients, args.requests, args.tokens, args.max_seconds)
                )
            )
            for _ in range(args.decode_repeats):
                turns.append(batch1_round(servers, worker, args.decode_tokens, len(turns)))
    finally:
        for each in servers.values():
            each.stop()
        worker.stop()
    lone, many = pooled(lone_rounds), pooled(many_rounds)
    rows = []
    for label, result in (("1 client", lone), (f"{args.clients} clients", many)):
        rows.append(
            [
                mixer,
                label,
                f"{result['requests'] - result['errors']}/{result['requests']}",
                f"{result['complete']}/{result['requests']}",
                f"{result['tokens_per_s']:.0f}",
                f"{result['tokens_per_s'] / lone['tokens_per_s']:.1f}x",
                f"{1000 * result['ttft_p50']:.0f} / {1000 * result['ttft_p99']:.0f}",
                f"{1000 * result['itl_p50']:.1f} / {1000 * result['itl_p99']:.1f}",
            ]
        )
        if result["first_error"]:
            print(f"{mixer}, {label}: first error: {result['first_error']}", file=sys.stderr)
    return rows, batch1_rows(mixer, turns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixers", default="attention,gla")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of every phase, in turns (median)"
    )
    parser.add_argument(
        "--decode-repeats", type=int, default=5, help="batch-1 turns per round (median ratio)"
    )
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="also time batch 1 through a server from this lmlab src folder (another checkout)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="bound per phase")
    parser.add_argument("--generate-worker", metavar="RUN", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.generate_worker:
        generate_worker(args.generate_worker)
        return
    print(
        f"{machine()}, {args.threads} threads; gpt-tiny size, trained 1 step; "
        f"{args.requests} requests x {args.tokens} tokens per client, temperature 0.8; "
        f"batch 1: {args.rounds} x {args.decode_repeats} turns of {args.decode_tokens} "
        "greedy tokens"
        + (f", baseline server from {args.baseline_src}" if args.baseline_src else "")
        + "\n"
    )
    load_rows, batch1 = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for mixer in args.mixers.split(","):
            rows, overhead = bench_family(args, Path(scratch), mixer)
            load_rows += rows
            batch1 += overhead
    header = ["model", "load", "ok", "complete", "tokens/s", "vs 1 client", "TTFT p50/p99 ms"]
    print_table([*header, "ITL p50/p99 ms"], load_rows)
    print()
    header = ["model", "batch 1", "tokens/s", "tokens/s lost", "range", "CPU us/token"]
    print_table([*header, "CPU vs generate"], batch1, "llrrrrr")


if __name__ == "__main__":
    main()

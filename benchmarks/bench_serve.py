"""Load test of ``lmlab serve`` on loopback, and its overhead against ``lmlab generate``.

For each mixer family (attention, and GLA as the recurrent one) at the ``gpt-tiny`` preset's
size, a run is trained for ONE step (so its weights are in effect random: decode speed does
not depend on them) and served by ``python -m lmlab serve`` in a child process. Then:

1. one streaming client alone: tokens/s, time to first token (TTFT), inter-token latency (ITL);
2. ``--clients`` concurrent streaming clients (prompts of different lengths), each making
   ``--requests`` requests of ``--tokens`` tokens: errors, complete streams, aggregate tokens/s
   and its ratio to the lone stream's, p50/p99 TTFT and ITL;
3. greedy tokens/s of one request at batch 1 (a 51-character prompt, ``--decode-tokens``
   tokens, timed from sending the request to ``[DONE]``) through the server against
   ``lmlab generate``'s path (``stream_tokens`` in a worker process, same threads, timed over
   its prefill and tokens): the server's overhead. (Timing from the first token to the last
   instead misleads on a busy machine: a client descheduled at the first token then reads the
   rest in one burst.) The same request through the scheduler driven in that worker, without
   HTTP, separates the scheduler's cost from the HTTP side's.

The three phases run in turns for ``--rounds`` rounds (tokens/s: the median round; latencies:
percentiles over every round), so a busy neighbour falls on all of them alike. Everything is
bounded: a fixed number of requests, and ``--max-seconds`` per phase.

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
from pathlib import Path

import httpx
import torch

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


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


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


def child_env(threads: int) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return os.environ | {"PYTHONPATH": src, "OMP_NUM_THREADS": str(threads)}


class Server:
    """``python -m lmlab serve RUN --port 0`` in a child process, stopped with SIGTERM."""

    def __init__(self, run: Path, threads: int, max_batch: int) -> None:
        command = [sys.executable, "-m", "lmlab", "serve", str(run), "--port", "0"]
        command += ["--max-batch", str(max_batch), "--max-tokens-limit", "4096"]
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, text=True, env=child_env(threads)
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


def decode_rate_server(server: Server, tokens: int) -> float:
    """Greedy tokens/s of one request through the server, from sending it to ``[DONE]``."""

    async def run() -> float:
        async with httpx.AsyncClient(timeout=300) as http:
            start = time.perf_counter()
            result = await one_stream(http, server, LINES[1], tokens, temperature=0.0)
            return result["tokens"] / (time.perf_counter() - start)

    return asyncio.run(run())


def generate_worker(run: str) -> None:
    """``--generate-worker RUN``: load the run, then for each line ``PATH N`` on stdin print
    the greedy tokens/s of one ``N``-token request (timed over its prefill and tokens) through
    ``lmlab generate``'s path (``stream_tokens``) when PATH is ``generate``, or through the
    scheduler driven in this process, without HTTP, when it is ``scheduler``. A process of its
    own, idle between rounds like the server, so the OS treats both sides alike."""
    _, model, tokenizer, _ = load_trained_model(run)
    ids = tokenizer.encode(LINES[1])
    greedy = SamplingSettings(temperature=0.0)
    scheduler = Scheduler(model, tokenizer)
    scheduler.start()
    for line in sys.stdin:
        path, tokens = line.split()
        start = time.perf_counter()
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
        print(count / (time.perf_counter() - start), flush=True)
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

    def rate(self, path: str, tokens: int) -> float:
        self.process.stdin.write(f"{path} {tokens}\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(60)


def bench_family(args: argparse.Namespace, folder: Path, mixer: str) -> list[list[object]]:
    run = train_run(folder, mixer)
    server = Server(run, args.threads, args.clients)
    worker = GenerateWorker(run, args.threads)
    phases: dict[str, list] = {key: [] for key in ("lone", "many", "served", "direct", "scheduler")}
    try:
        asyncio.run(load(server, 1, 1, 8, args.max_seconds))  # warm-up, not reported
        for _ in range(args.rounds):  # in turns, so a busy neighbour hits every phase alike
            phases["lone"].append(
                asyncio.run(load(server, 1, args.requests, args.tokens, args.max_seconds))
            )
            phases["many"].append(
                asyncio.run(
                    load(server, args.clients, args.requests, args.tokens, args.max_seconds)
                )
            )
            phases["served"].append(decode_rate_server(server, args.decode_tokens))
            phases["direct"].append(worker.rate("generate", args.decode_tokens))
            phases["scheduler"].append(worker.rate("scheduler", args.decode_tokens))
    finally:
        server.stop()
        worker.stop()
    lone, many = pooled(phases["lone"]), pooled(phases["many"])
    serve_rate = statistics.median(phases["served"])
    generate_rate = statistics.median(phases["direct"])
    scheduler_rate = statistics.median(phases["scheduler"])
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
    for label, rate in (("batch 1, HTTP", serve_rate), ("batch 1, no HTTP", scheduler_rate)):
        overhead = (generate_rate - rate) / generate_rate
        rows.append(
            [
                mixer,
                label,
                "",
                "",
                f"{rate:.0f} (generate: {generate_rate:.0f})",
                f"overhead {100 * overhead:.1f}%",
                "",
                "",
            ]
        )
    return rows


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
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="bound per phase")
    parser.add_argument("--generate-worker", metavar="RUN", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.generate_worker:
        generate_worker(args.generate_worker)
        return
    print(
        f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} threads; gpt-tiny size, trained 1 step; "
        f"{args.requests} requests x {args.tokens} tokens per client, temperature 0.8\n"
    )
    header = ["model", "load", "ok", "complete", "tokens/s", "vs 1 client", "TTFT p50/p99 ms"]
    header.append("ITL p50/p99 ms")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as scratch:
        for mixer in args.mixers.split(","):
            for row in bench_family(args, Path(scratch), mixer):
                print("| " + " | ".join(str(cell) for cell in row) + " |", flush=True)


if __name__ == "__main__":
    main()

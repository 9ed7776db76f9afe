"""Load test of `nanoseek serve` on loopback: 64 concurrent streaming clients vs the same requests one at a time.

    python benchmarks/server_load.py                      # tiny preset, random weights, CPU
    python benchmarks/server_load.py --model runs/tiny    # a trained run instead
    python benchmarks/server_load.py --new-tokens 64,256  # reasoning-length answers instead of 8-64 tokens
    python benchmarks/server_load.py --device cuda

The server runs as its own process (`python -m nanoseek serve`, bound to 127.0.0.1 on a free port), so client and
server do not share a GIL; one server per `--threads` value (1 and 2 by default), since on a small machine the
clients compete with the server's threads. Every request streams (SSE) with a different prompt length and a
fixed number of new tokens (ignore_eos, so both runs make exactly the same tokens); tokens/s = completion
tokens / wall time of the whole run. A request counts as an error unless it answers 200, ends with `data: [DONE]` and reports the expected
completion tokens in its include_usage chunk. All traffic goes to 127.0.0.1; counts and time are bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.checkpoint import save_model  # noqa: E402
from nanoseek.config import preset  # noqa: E402
from nanoseek.model.transformer import DeepseekV3ForCausalLM  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402
from results_md import write_section  # noqa: E402 (benchmarks/ is the script's directory)

SECTION = "## Server load test (issue 6)"
WORDS = "the quick brown fox jumps over a lazy dog while twelve plus thirty makes forty two".split()


def make_model(directory: Path) -> Path:
    """`tiny` preset with random weights and a tokenizer trained on the built-in corpus."""
    from nanoseek.cli import main

    tok_dir = directory / "tokenizer"
    assert main(["tokenizer", "train", "--data", "builtin:2000", "--vocab-size", "512", "--out", str(tok_dir)]) == 0
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(preset("tiny").replace(vocab_size=tok.vocab_size)).eval()
    return save_model(model, directory / "model", tokenizer=tok)


def requests_for(n: int, seed: int, new_tokens: tuple[int, int] = (8, 64)) -> list[dict]:
    """Mixed lengths: prompts of 4..96 words, new_tokens[0]..new_tokens[1] new tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 96)))
        out.append({"messages": [{"role": "user", "content": prompt}], "max_tokens": rng.randint(*new_tokens),
                    "temperature": 0.6, "seed": rng.randint(0, 9999), "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}})
    return out


async def one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[bool, int, float, int]:
    """(ok, completion tokens, latency, prompt tokens) of one streamed request."""
    t0 = time.perf_counter()
    tokens, prompt_tokens, done = 0, 0, False
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return False, 0, time.perf_counter() - t0, 0
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                        prompt_tokens = chunk["usage"]["prompt_tokens"]
    except httpx.HTTPError:
        return False, 0, time.perf_counter() - t0, 0
    return done and tokens == body["max_tokens"], tokens, time.perf_counter() - t0, prompt_tokens


async def run(url: str, bodies: list[dict], concurrent: bool) -> dict:
    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one(client, url, b) for b in bodies))
        else:
            results = [await one(client, url, b) for b in bodies]
        wall = time.perf_counter() - t0
    lat = sorted(r[2] for r in results)
    tokens = sum(r[1] for r in results)
    return {"requests": len(bodies), "errors": sum(not r[0] for r in results), "tokens": tokens, "wall_s": wall,
            "prompt_tokens": sum(r[3] for r in results),
            "tok_s": tokens / wall, "p50_s": lat[len(lat) // 2], "p95_s": lat[int(len(lat) * 0.95) - 1]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_load(model_dir: Path, args, threads: int) -> tuple[dict, dict, dict]:
    """Start a server with `threads` torch threads; (concurrent run, one-at-a-time run, /metrics after the first)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "nanoseek", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(args.clients), "--max-queue", str(args.clients), "--device", args.device]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the server did not come up in 120 s"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        url = base + "/v1/chat/completions"
        bodies = requests_for(args.clients, args.seed, args.new_tokens)
        asyncio.run(run(url, requests_for(4, args.seed + 1), concurrent=True))  # warm-up
        conc = asyncio.run(run(url, bodies, concurrent=True))
        peak = httpx.get(base + "/metrics").json()
        seq = asyncio.run(run(url, bodies, concurrent=False))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return conc, seq, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a model or run directory (default: tiny, random weights)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--threads", default="1,2",
                    help="torch threads in the server process, one server per value (comma-separated)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--new-tokens", default="8,64", help="MIN,MAX new tokens per request (default 8,64: chat-length "
                    "answers; reasoning traces run to hundreds)")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = ap.parse_args()
    try:
        thread_counts = [int(t) for t in args.threads.split(",")]
        args.new_tokens = tuple(int(t) for t in args.new_tokens.split(","))
    except ValueError:
        ap.error("--threads takes integers like 1,2 and --new-tokens two integers like 8,64")
    if min(thread_counts) < 1 or len(args.new_tokens) != 2 or not 1 <= args.new_tokens[0] <= args.new_tokens[1]:
        ap.error("--threads must be >= 1 and --new-tokens MIN,MAX with 1 <= MIN <= MAX")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else make_model(Path(tmp))
        for threads in thread_counts:
            results[threads] = serve_and_load(model_dir, args, threads)

    rows, speedups = [], []
    for threads, (conc, seq, peak) in results.items():
        rows += [(f"{threads} thread(s), one at a time", seq), (f"{threads} thread(s), {args.clients} concurrent", conc)]
        speedups.append(f"{conc['tok_s'] / seq['tok_s']:.1f}x with {threads} thread(s) ({peak['requests_served']} "
                        f"requests served, {peak['engine_steps']} engine steps after the concurrent run)")
    best_conc = max(r[0]["tok_s"] for r in results.values())
    best_seq = max(r[1]["tok_s"] for r in results.values())
    worst = min(r[0]["tok_s"] / r[1]["tok_s"] for r in results.values())
    table = "\n".join(f"| {name} | {r['requests']} | {r['errors']} | {r['tokens']:,} | {r['wall_s']:.1f} | "
                      f"{r['tok_s']:.1f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} |" for name, r in rows)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores visible (clients and server share them), device "
               f"{args.device}, torch {torch.__version__}")
    what = f"`{args.model}`" if args.model else "`tiny` preset, random weights, tokenizer trained on builtin:2000"

    section = SECTION if args.new_tokens == (8, 64) else f"{SECTION}, {args.new_tokens[0]}-{args.new_tokens[1]} new tokens"
    text = f"""{section}

`python benchmarks/server_load.py{' --model ' + args.model if args.model else ''} --new-tokens {args.new_tokens[0]},{args.new_tokens[1]}`

Machine: {machine}. Model: {what}. Server: `nanoseek serve --max-batch {args.clients}` in its own
process on 127.0.0.1, once per torch thread count; clients: httpx async, every request streaming (SSE) a chat
completion with include_usage. {args.clients} requests with mixed lengths (prompts of 4-96 words, {args.new_tokens[0]}-{args.new_tokens[1]} new tokens
with ignore_eos, temperature 0.6, seeded), sent all at once, then the same requests one at a time. Tokens/s =
completion tokens / wall time.

| server, run | requests | errors | completion tokens | wall s | tokens/s | p50 latency s | p95 latency s |
|---|---|---|---|---|---|---|---|
{table}

Aggregate speed-up from continuous batching: {'; '.join(speedups)}. Best concurrent against best one-at-a-time
run, whatever the threads: **{best_conc / best_seq:.1f}x** (target >= 5x: {'met' if best_conc / best_seq >= 5 else 'not met'}; the
least favourable thread count gives {worst:.1f}x).

Why the speed-up depends on the mix: prefill is the same work whether prompts come together or one at a time
(batching only makes its matrix products somewhat more efficient), while decoding many requests together costs
little more per step than decoding one. Here the prompts hold {rows[0][1]['prompt_tokens']:,} tokens against
{rows[0][1]['tokens']:,} completion tokens, so the longer the answers, the more of the work batching speeds up.
"""
    print(text)
    if not args.no_write:
        write_section(section, text)


if __name__ == "__main__":
    main()

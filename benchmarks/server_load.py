"""Load test of `nanoseek serve` on loopback: 64 concurrent streaming clients vs the same requests one at a time.

    python benchmarks/server_load.py                      # tiny preset, random weights, CPU
    python benchmarks/server_load.py --model runs/tiny    # a trained run instead
    python benchmarks/server_load.py --device cuda

The server runs as its own process (`python -m nanoseek serve`, bound to 127.0.0.1 on a free port), so client and
server do not share a GIL. Every request streams (SSE) with a different prompt length and a fixed number of new
tokens (ignore_eos, so both runs make exactly the same tokens); tokens/s = completion tokens / wall time of the
whole run. A request counts as an error unless it answers 200, ends with `data: [DONE]` and reports the expected
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


def requests_for(n: int, seed: int) -> list[dict]:
    """Mixed lengths: prompts of 4..96 words, 8..64 new tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 96)))
        out.append({"messages": [{"role": "user", "content": prompt}], "max_tokens": rng.randint(8, 64),
                    "temperature": 0.6, "seed": rng.randint(0, 9999), "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}})
    return out


async def one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[bool, int, float]:
    t0 = time.perf_counter()
    tokens, done = 0, False
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return False, 0, time.perf_counter() - t0
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError:
        return False, 0, time.perf_counter() - t0
    return done and tokens == body["max_tokens"], tokens, time.perf_counter() - t0


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
            "tok_s": tokens / wall, "p50_s": lat[len(lat) // 2], "p95_s": lat[int(len(lat) * 0.95) - 1]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a model or run directory (default: tiny, random weights)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server process")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else make_model(Path(tmp))
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
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
            bodies = requests_for(args.clients, args.seed)
            asyncio.run(run(url, requests_for(4, args.seed + 1), concurrent=True))  # warm-up
            conc = asyncio.run(run(url, bodies, concurrent=True))
            peak = httpx.get(base + "/metrics").json()
            seq = asyncio.run(run(url, bodies, concurrent=False))
        finally:
            server.terminate()
            server.wait(timeout=30)

    speedup = conc["tok_s"] / seq["tok_s"]
    rows = [("one at a time", seq), (f"{args.clients} concurrent", conc)]
    table = "\n".join(f"| {name} | {r['requests']} | {r['errors']} | {r['tokens']:,} | {r['wall_s']:.1f} | "
                      f"{r['tok_s']:.1f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} |" for name, r in rows)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores visible, server with {args.threads} torch thread(s), "
               f"device {args.device}, torch {torch.__version__}")
    what = f"`{args.model}`" if args.model else "`tiny` preset, random weights, tokenizer trained on builtin:2000"

    text = f"""{SECTION}

`python benchmarks/server_load.py{' --model ' + args.model if args.model else ''}`

Machine: {machine}. Model: {what}. Server: `nanoseek serve --max-batch {args.clients}` in its own
process on 127.0.0.1; clients: httpx async, every request streaming (SSE) a chat completion with include_usage.
{args.clients} requests with mixed lengths (prompts of 4-96 words, 8-64 new tokens with ignore_eos, temperature
0.6, seeded), sent all at once, then the same requests one at a time. Tokens/s = completion tokens / wall time.

| run | requests | errors | completion tokens | wall s | tokens/s | p50 latency s | p95 latency s |
|---|---|---|---|---|---|---|---|
{table}

Aggregate speed-up from continuous batching: **{speedup:.1f}x** (target >= 5x: {'met' if speedup >= 5 else 'not met'}).
/metrics right after the concurrent run: {peak['requests_served']} requests served, {peak['engine_steps']} engine steps.
"""
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()

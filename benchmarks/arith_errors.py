"""Where a model's arithmetic goes wrong: held-out greedy and sampled accuracy by operation.

    python benchmarks/arith_errors.py runs/speedrun4/sft --difficulty 2 --samples 8

Greedy pass@1, R1's sampled pass@1 (temperature 0.6, top-p 0.95) and pass@k for a + b, a - b (a >= b), a - b
(a < b, the trace negates) and a * b, on the same held-out problems `nanoseek eval` uses; then a few greedy
failures beside the reference trace. RL can only sharpen what sampling already finds: pass@k against greedy is
the headroom.
"""

import argparse
from collections import defaultdict

import torch

from nanoseek.checkpoint import load_model, resolve_model_dir
from nanoseek.data.tasks import get_task
from nanoseek.evaluate import task_problems
from nanoseek.infer.engine import Engine
from nanoseek.tokenizer import Tokenizer


def kind(problem) -> str:
    if problem["op"] == "-":
        return "a - b, a >= b" if problem["a"] >= problem["b"] else "a - b, a < b"
    return f"a {problem['op']} b"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--difficulty", type=int, default=2)
    ap.add_argument("--num", type=int, default=100)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--show", type=int, default=3, help="greedy failures to print")
    args = ap.parse_args()

    path = resolve_model_dir(args.model)
    engine = Engine(load_model(path, dtype=torch.float32).eval(), tokenizer=Tokenizer.load(path), max_batch=64)
    task = get_task("arithmetic")
    problems = task_problems(task, args.num, args.difficulty)
    chats = [[{"role": "user", "content": task.prompt(p)}] for p in problems]
    greedy = engine.generate(chats, max_tokens=args.max_tokens, chat=True, temperature=0.0)
    k = args.samples
    sampled = engine.generate([c for c in chats for _ in range(k)], max_tokens=args.max_tokens, chat=True,
                              temperature=0.6, top_p=0.95, seed=1)
    rows = defaultdict(lambda: [0, 0.0, 0.0, 0.0])  # n, greedy, sampled pass@1, pass@k
    shown = 0
    for i, p in enumerate(problems):
        right = task.verify(p, greedy[i].text).accuracy
        hits = [task.verify(p, o.text).accuracy for o in sampled[i * k:(i + 1) * k]]
        for key in (kind(p), "all"):
            r = rows[key]
            r[0] += 1
            r[1] += right
            r[2] += sum(hits) / k
            r[3] += max(hits)
        if not right and shown < args.show:
            shown += 1
            print(f"{p.data}\n  model: {greedy[i].text!r}\n  truth: {task.solution(p)!r}")
    print(f"\n| {args.difficulty} digits, {args.num} problems | n | greedy | sampled pass@1 | pass@{k} |")
    print("|---|---|---|---|---|")
    for key in sorted(rows, key=lambda x: (x == "all", x)):
        n, g, s, a = rows[key]
        print(f"| {key} | {n} | {g / n:.2f} | {s / n:.2f} | {a / n:.2f} |")


if __name__ == "__main__":
    main()

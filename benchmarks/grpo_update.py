"""What a GRPO step on countdown costs, part by part, on a real rollout of a trained model.

1. The update: forward + backward of the completions' log-probs over one rollout (P prompts x G samples), cut
   into micro-batches three ways. The gradient is the same in all three; tests/test_grpo.py checks the last
   against one plain forward over every prompt + completion.
   - padded: every prompt + completion padded to the rollout's longest (nanoseek before session 8);
   - trimmed: sorted by length, each micro-batch padded to its own longest (session 8);
   - shared prompts: as trimmed, and each distinct prompt runs once per micro-batch, its completions attending
     to its latents (`PromptLatents`, now).
2. The rollout: P' prompts x G samples generated with the engine decoding 64, 128 or 256 rows at a time
   (dynamic sampling's later rounds generate up to 4P prompts).

Each figure is the best of --reps, the layouts interleaved so that a machine slowing down hurts them alike.

    python benchmarks/grpo_update.py --model runs/base            # writes its section of benchmarks/RESULTS.md
    python benchmarks/grpo_update.py --quick --no-write           # smoke model, seconds: checks it runs
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.checkpoint import load_model, resolve_model_dir, save_model
from nanoseek.config import preset
from nanoseek.data.tasks import builtin_corpus
from nanoseek.infer.engine import Engine
from nanoseek.model.transformer import DeepseekV3ForCausalLM
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.completions import right_padded, token_logps
from nanoseek.train.grpo import GRPOConfig, RolloutBatches
from results_md import publish  # noqa: E402 (benchmarks/ is the script's directory)

SECTION = "## GRPO step, part by part (issue 5)"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/base", help="a trained model or run directory with its tokenizer")
    p.add_argument("--task", default="countdown")
    p.add_argument("--difficulty", default="2")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step, P")
    p.add_argument("--group-size", type=int, default=8, help="G")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--rollout-prompts", type=int, default=32, help="P' for the rollout timing (4P: a late round)")
    p.add_argument("--rows", default="64,128,256", help="engine rows to time the rollout at")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="a fresh smoke model, small shapes, one rep")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.prompts, a.group_size, a.micro_batches, a.max_new_tokens = 2, 4, 2, 8
        a.rollout_prompts, a.rows, a.reps, a.task, a.difficulty = 2, "4,8", 1, "arithmetic", "1"
    return a


def smoke_model(root: Path) -> Path:
    torch.manual_seed(0)
    tok = Tokenizer.train(builtin_corpus(500, seed=0), preset("smoke").vocab_size)
    return save_model(DeepseekV3ForCausalLM(preset("smoke")), root / "model", tokenizer=tok)


def main() -> int:
    a = parse()
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            directory = smoke_model(Path(tmp)) if a.quick else resolve_model_dir(a.model)
        except FileNotFoundError as e:
            raise SystemExit(f"grpo_update.py: {e}") from None
        tok = Tokenizer.load(directory)
        model = load_model(directory, dtype=torch.float32).train()
    torch.manual_seed(0)
    cfg = GRPOConfig(task=a.task, difficulty=a.difficulty, group_size=a.group_size, prompts_per_step=a.prompts,
                     max_new_tokens=a.max_new_tokens, temperature=a.temperature, eval_num=0).validate()
    rb = RolloutBatches(model, tok, cfg, a.micro_batches)
    prompts, columns, outputs = rb.sample_groups(a.prompts)
    # the rewards only set the advantages, which do not change the cost
    shared = rb._tensorize([(p, c, o, [float(i % 2) for i in range(len(o))])
                            for p, c, o in zip(prompts, columns, outputs)])
    seqs = [o.prompt_token_ids + o.token_ids for group in outputs for o in group]
    k, n, pad = a.micro_batches, len(seqs), tok.pad_id
    cuts = [(round(j * n / k), round((j + 1) * n / k)) for j in range(k)]
    longest = max(map(len, seqs))
    padded = [right_padded(seqs[i:j], pad, longest) for i, j in cuts]
    by_length = sorted(seqs, key=len)
    trimmed = [right_padded(by_length[i:j], pad) for i, j in cuts]

    def plain(ids: torch.Tensor) -> torch.Tensor:  # what the update ran before PromptLatents
        logits = model(ids)[:, :-1].float() / a.temperature
        return torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:, None]).squeeze(2)

    layouts = {"padded to the rollout's longest": (plain, padded),
               "sorted, trimmed per micro-batch": (plain, trimmed),
               "trimmed + each prompt once (now)": (lambda mb: token_logps(model, mb, a.temperature), shared)}
    tokens = {"padded to the rollout's longest": sum(x.numel() for x in padded),
              "sorted, trimmed per micro-batch": sum(x.numel() for x in trimmed),
              "trimmed + each prompt once (now)": sum(mb.prompt_ids.numel() + mb.completion_ids.numel()
                                                      for mb in shared)}
    best = dict.fromkeys(layouts, float("inf"))
    for rep in range(a.reps):
        for name, (logps, batches) in layouts.items():
            t0 = time.perf_counter()
            for mb in batches:
                logps(mb).sum().backward()
            best[name] = min(best[name], time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        print(f"  update rep {rep}: " + ", ".join(f"{v:.2f}s" for v in best.values()), flush=True)

    model.eval()
    task_prompts = [[{"role": "user", "content": rb.source.get(10_000 + i)[0]}] for i in range(a.rollout_prompts)]
    chats = [c for c in task_prompts for _ in range(a.group_size)]
    rows = [int(r) for r in a.rows.split(",")]
    gen = dict.fromkeys(rows, float("inf"))
    made = 0
    for rep in range(a.reps):
        for r in rows:
            engine = Engine(model, tokenizer=tok, max_batch=r, max_len=256 + a.max_new_tokens)
            t0 = time.perf_counter()
            outs = engine.generate(chats, max_tokens=a.max_new_tokens, chat=True, temperature=a.temperature, seed=1)
            gen[r] = min(gen[r], time.perf_counter() - t0)
            made = sum(len(o.token_ids) for o in outs)
        print(f"  rollout rep {rep}: " + ", ".join(f"{r} rows {gen[r]:.2f}s" for r in rows), flush=True)

    mean_prompt = sum(o.prompt_tokens for g in outputs for o in g) / n
    mean_completion = sum(len(o.token_ids) for g in outputs for o in g) / n
    base = best["padded to the rollout's longest"]
    text = "\n".join([
        SECTION, "",
        f"`python benchmarks/grpo_update.py{' --quick' if a.quick else ' --model ' + str(a.model)}`. Machine: "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, float32; best of {a.reps}, interleaved.", "",
        f"**The update** on one {a.task} (difficulty {a.difficulty}) rollout of {a.prompts} prompts x "
        f"{a.group_size} samples at temperature {a.temperature}: prompts {mean_prompt:.0f} tokens and completions "
        f"{mean_completion:.0f} on average, the longest sequence {longest}. Forward + backward of the completions' "
        f"log-probs in {k} micro-batches:", "",
        "| layout | tokens through the model | seconds | vs padded |", "|---|---|---|---|",
        *[f"| {name} | {tokens[name]:,} | {best[name]:.2f} | {base / best[name]:.2f}x |" for name in layouts], "",
        f"**The rollout:** {a.rollout_prompts} prompts x {a.group_size} samples ({made:,} new tokens, up to "
        f"{a.max_new_tokens} each), the engine decoding this many rows at a time:", "",
        "| engine rows | seconds | new tokens/s |", "|---|---|---|",
        *[f"| {r} | {gen[r]:.2f} | {made / gen[r]:,.0f} |" for r in rows], ""])
    publish(SECTION, text, write=not a.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

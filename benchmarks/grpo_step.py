"""One GRPO step, nanoseek vs TRL's GRPOTrainer, on the same Hugging Face-layout model, side by side in one run.

Both start from the same directory (ours saved with `save_model` + tokenizer; TRL loads it with transformers'
AutoModelForCausalLM and AutoTokenizer), get the same chat prompts (task train-split problems), the same group
size, the same completion length (EOS ignored / suppressed, so every completion is exactly --max-new-tokens
long) and the same settings: beta 0, loss "dapo", one optimisation pass, temperature 1, the whole rollout batch
in one micro-batch, AdamW. A step = generate P x G completions + score them with the task verifier + forward,
backward and optimizer step. We report the median over the timed steps after warm-up steps.

    python benchmarks/grpo_step.py                     # tiny preset, writes benchmarks/RESULTS.md
    python benchmarks/grpo_step.py --quick --no-write  # smoke preset, seconds: checks that both sides run
    python benchmarks/grpo_step.py --device cuda       # on a GPU: bf16 autocast on both sides

`trl` is a benchmark-only dependency: pip install trl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from nanoseek.checkpoint import save_model
from nanoseek.config import preset
from nanoseek.data.tasks import Problem, builtin_corpus, get_task
from nanoseek.model.transformer import DeepseekV3ForCausalLM
from nanoseek.tokenizer import Tokenizer
from results_md import publish, set_up  # noqa: E402 (benchmarks/ is the script's directory)

SECTION = "## GRPO step vs TRL (issue 5)"
GPU_SECTION = "## GRPO step vs TRL on a GPU (issue 5)"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--model", default=None, help="an existing model directory with tokenizer (default: fresh preset)")
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step, P")
    p.add_argument("--group-size", type=int, default=8, help="G")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16 autocast over fp32 weights, both sides)")
    p.add_argument("--quick", action="store_true", help="smoke preset, tiny shapes, one timed step")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.preset, a.prompts, a.group_size, a.max_new_tokens, a.warmup, a.steps = "smoke", 2, 2, 8, 0, 1
    return a


def gpu(a) -> bool:
    return a.device.startswith("cuda")


def make_model_dir(a, root: Path) -> Path:
    if a.model:
        return Path(a.model)
    torch.manual_seed(0)
    tok = Tokenizer.train(builtin_corpus(2000, seed=0), preset(a.preset).vocab_size)
    model = DeepseekV3ForCausalLM(preset(a.preset))
    return save_model(model, root / "model", tokenizer=tok)


def prompts_for(a) -> list[Problem]:
    task = get_task(a.task)
    # enough distinct problems for warm-up + timed steps on both sides
    return [task.sample("train", i) for i in range((a.warmup + a.steps + 1) * a.prompts)]


# ============================================================================ nanoseek
def run_nanoseek(a, model_dir: Path, problems: list[Problem]) -> list[float]:
    from nanoseek.checkpoint import load_model
    from nanoseek.train.grpo import GRPOConfig, GRPOTrainer, RolloutBatches, make_loss_fn
    from nanoseek.train.loop import TrainConfig

    cfg = GRPOConfig(task=a.task, group_size=a.group_size, prompts_per_step=a.prompts,
                     max_new_tokens=a.max_new_tokens, loss_type="dapo", beta=0.0, eval_num=0,
                     max_batch=a.prompts * a.group_size, ignore_eos=True).validate()
    model = load_model(model_dir, dtype=torch.float32, device=a.device).train()
    tok = Tokenizer.load(model_dir)
    batches = RolloutBatches(model, tok, cfg, num_chunks=1)
    task = get_task(a.task)
    # the same problems TRL gets, in the same order
    batches.source.get = lambda i: (task.prompt(problems[i]), {"problem": problems[i].to_dict()})
    train = TrainConfig(steps=10_000, lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=0.0,
                        batch_size=a.prompts * a.group_size, precision="bf16" if gpu(a) else "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = GRPOTrainer(model, train, tmp, batches, make_loss_fn(cfg), stage="grpo")
        times = []
        for i in range(a.warmup + a.steps):
            t0 = time.perf_counter()
            out = trainer.train_step()
            dt = time.perf_counter() - t0
            print(f"  nanoseek step {i}: {dt:.2f}s (rollout {out['rollout_seconds']:.2f}s, "
                  f"length {out['response_length']:.0f})", flush=True)
            if i >= a.warmup:
                times.append(dt)
    return times


# ============================================================================ TRL
def run_trl(a, model_dir: Path, problems: list[Problem]) -> tuple[list[float], str]:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    task = get_task(a.task)

    def reward(prompts, completions, problem, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [task.verify(Problem.from_dict(json.loads(p)), t).total for p, t in zip(problem, texts)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            print(f"  TRL step {len(self.times) - 1}: {self.times[-1]:.2f}s", flush=True)

    tok = AutoTokenizer.from_pretrained(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n = a.warmup + a.steps
    rows = [{"prompt": [{"role": "user", "content": task.prompt(p)}], "problem": json.dumps(p.to_dict())}
            for p in problems[: n * a.prompts]]
    bs = a.prompts * a.group_size
    with tempfile.TemporaryDirectory() as tmp:
        args = trl.GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=bs, gradient_accumulation_steps=1, steps_per_generation=1,
            num_generations=a.group_size, max_completion_length=a.max_new_tokens, num_iterations=1, beta=0.0,
            loss_type="dapo", temperature=1.0, top_p=1.0, learning_rate=1e-4, weight_decay=0.0,
            lr_scheduler_type="constant", warmup_steps=0, max_steps=n, use_cpu=not gpu(a), bf16=gpu(a),
            report_to="none", logging_steps=1, save_strategy="no", seed=0, shuffle_dataset=False,
            generation_kwargs={"min_new_tokens": a.max_new_tokens})  # no early EOS: equal lengths on both sides
        timer = Timer()
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tok, callbacks=[timer])
        trainer.train()
    return timer.times[a.warmup:], trl.__version__


# ============================================================================ results
def main() -> int:
    a = parse()
    if not set_up("grpo_step", a.device, a.threads):
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as root:
        model_dir = make_model_dir(a, Path(root))
        problems = prompts_for(a)
        print(f"model {model_dir} ({a.preset if not a.model else a.model}); {a.prompts} prompts x {a.group_size} "
              f"samples x {a.max_new_tokens} new tokens; {torch.get_num_threads()} threads")
        ours = run_nanoseek(a, model_dir, problems)
        theirs, trl_version = run_trl(a, model_dir, problems)
    mo, mt = statistics.median(ours), statistics.median(theirs)
    import transformers

    text = "\n".join([
        GPU_SECTION if gpu(a) else SECTION, "",
        f"One GRPO step (generate {a.prompts} prompts x {a.group_size} samples x {a.max_new_tokens} tokens, verify, "
        f"forward + backward + AdamW) on the same `{a.preset if not a.model else a.model}` model directory, "
        + (f"bf16 autocast over fp32 weights on {torch.cuda.get_device_name()}, " if gpu(a) else
           f"fp32 on the CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), ") +
        f"median of {a.steps} step(s) after {a.warmup} warm-up.", "",
        "| implementation | seconds per step | speed-up |", "|---|---|---|",
        f"| nanoseek (engine: continuous batching over the latent cache) | {mo:.2f} | {mt / mo:.1f}x |",
        f"| TRL {trl_version} GRPOTrainer (transformers {transformers.__version__} generate) | {mt:.2f} | 1.0x |",
        "", f"Target: nanoseek >= 5x faster: **{'met' if mt / mo >= 5 else 'not met'}**. "
        f"Reproduce: `python benchmarks/grpo_step.py{' --quick' if a.quick else ''}"
        f"{' --device ' + a.device if gpu(a) else ''}`.", ""])
    publish(GPU_SECTION if gpu(a) else SECTION, text, write=not a.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Draft tuning: train a model's MTP modules on the model's own greedy outputs, so more of their drafts pass.

Speculative decoding (infer/speculative.py) pays for every drafted token: on `tiny`, a step drafting two tokens
costs about twice a plain one, so it gains 1.5x only when nearly every draft is accepted. Pretraining
teaches the MTP modules to predict the corpus, but at decode time a draft passes only if it is the token the
model itself would pick. So this stage asks the model to answer prompts like the ones it will serve (greedy,
with the engine), and trains only the MTP modules to predict those answers, the model's own choices, chained as
in pretraining (module k predicts token t+k+1 from module k-1's state and token t+k). Everything else is frozen:
the main layers, the embedding, the head, the routing biases. The model's output is therefore unchanged, token
for token (checked on the held-out prompts); only its drafts change. Medusa and EAGLE train their draft heads
on self-generated data for the same reason.

    nanoseek draft-tune --init runs/base --run runs/drafts    (then `--speculative` in generate / chat / serve)

The run directory holds what any stage's does (config, metrics, checkpoints, model/, receipt.json) plus the
generated answers (answers.jsonl, reused on --resume) and acceptance.json: the held-out acceptance before and
after.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from nanoseek.checkpoint import atomic_write_json, atomic_write_text, load_model, resolve_model_dir, save_model
from nanoseek.data.tasks import get_task
from nanoseek.model.transformer import IGNORE_INDEX, DeepseekV3ForCausalLM
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.loop import Trainer, TrainConfig, peak_precision
from nanoseek.train.run import prepare_run
from nanoseek.train.sft import RowBatches, inputs_targets, pad_rows

if TYPE_CHECKING:
    from nanoseek.infer.engine import Engine

# Only the MTP modules learn, from a narrow set of answers: a fine-tuning rate, and the routing bias as it was.
TRAIN_DEFAULTS = {"lr": 3e-4, "warmup_steps": 10, "schedule": "cosine", "batch_size": 16, "seq_len": 512,
                  "eval_every": 50, "checkpoint_every": 200, "bias_freeze_frac": 0.0}

Prompt = tuple[Any, bool]  # (text, token ids or chat messages; whether to render it with the chat template)


def task_prompts(tasks: list[str], num: int, split: str) -> list[Prompt]:
    """`num` prompts of a split, the tasks in turn, as the chat template will present them."""
    chosen = [get_task(t) for t in tasks]
    return [(chosen[i % len(chosen)].prompt(chosen[i % len(chosen)].sample(split, i // len(chosen))), True)
            for i in range(num)]


def answer(engine: Engine, prompts: list[Prompt], max_tokens: int, speculative: bool, progress: bool) -> list:
    """Greedy outputs for every prompt, in order."""
    return engine.generate_mixed(prompts, max_tokens, temperature=0.0, speculative=speculative, progress=progress)


def acceptance(outs: list) -> float:
    drafted = sum(o.num_drafted for o in outs)
    return sum(o.num_accepted for o in outs) / drafted if drafted else 0.0


def examples(outs: list) -> list[tuple[list[int], list[int]]]:
    """(prompt + answer ids, loss mask): the loss is on the answer only, which is what the drafts must predict."""
    return [(o.prompt_token_ids + o.token_ids, [0] * len(o.prompt_token_ids) + [1] * len(o.token_ids)) for o in outs]


def one_per_row(rows: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids, mask) examples one per row, right-padded to the longest (at most seq_len + 1 tokens): (ids, mask,
    the number cut to fit). Not packed as SFT packs: an answer is the model's choice only in the context it was
    made in, its prompt alone, and the model attends across packed documents (in packed rows, its own top-1 on
    its answers fell to 80%)."""
    width = min(seq_len + 1, max(len(ids) for ids, _ in rows))
    ids_t, mask_t = pad_rows([(ids[:width], mask[:width]) for ids, mask in rows], width, pad_id)
    return ids_t, mask_t, sum(len(ids) > width for ids, _ in rows)


def freeze_all_but_mtp(model: DeepseekV3ForCausalLM) -> int:
    """Leave only the MTP modules trainable (the shared embedding and head stay frozen); returns their size."""
    model.requires_grad_(False)
    for module in model.mtp_modules:
        module.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def draft_loss(model: DeepseekV3ForCausalLM, batch, mtp_weight: float | None = None, soft: bool = False):
    """Mean loss of the MTP chain on the answer tokens, plus each depth's top-1 agreement with them (draft_k_top1:
    how often module k's draft would pass, given the drafts before it passed). With `soft`, module k learns the
    main model's whole next-token distribution at the position it drafts (cross-entropy to those probabilities);
    else the answer's token alone (the argmax of that distribution, since the answers are greedy). On `tiny`
    (2048 answers, 200 steps) greedy acceptance rose from 91.5% to 92.6% with the tokens, to 92.2% with `soft`;
    `soft` is there for sampled decoding, where a draft passes with probability sum(min(p, q))."""
    inputs, targets = (t.to(next(model.parameters()).device) for t in batch)
    with torch.no_grad():  # the main model is frozen: its states are inputs here
        h = model.hidden_states(inputs)
        teacher = model.lm_head(h).float().softmax(dim=-1) if soft else None
    losses, metrics = [], {}
    for k, logits in enumerate(model.mtp_logits(h, inputs)):
        wanted = targets[:, k + 1 :]
        seen = wanted != IGNORE_INDEX
        if soft:  # position i of depth k drafts token i+k+2, which the main model predicts at position i+k+1
            logp = logits.float().log_softmax(dim=-1)[seen]
            losses.append(-(teacher[:, k + 1 :][seen] * logp).sum(dim=-1).mean())
        else:
            losses.append(F.cross_entropy(logits.flatten(0, 1).float(), wanted.flatten(), ignore_index=IGNORE_INDEX))
        metrics[f"draft_{k + 1}_top1"] = (logits.argmax(-1)[seen] == wanted[seen]).float().mean().detach()
    loss = torch.stack(losses).mean()
    metrics["trained_tokens"] = float((targets != IGNORE_INDEX).sum())
    return loss, metrics, inputs.numel()


@torch.no_grad()
def held_out_draft_loss(batches: list, model: DeepseekV3ForCausalLM, soft: bool = False) -> dict[str, float]:
    """The same numbers on held-out answers, weighted by tokens: val_loss and val_draft_k_top1."""
    sums: dict[str, float] = {}
    for batch in batches:
        loss, metrics, _ = draft_loss(model, batch, soft=soft)
        n = metrics.pop("trained_tokens")
        for key, v in {"loss": loss, **metrics}.items():
            sums[key] = sums.get(key, 0.0) + float(v) * n
        sums["n"] = sums.get("n", 0.0) + n
    n = max(sums.pop("n", 0.0), 1.0)
    return {f"val_{k}": v / n for k, v in sums.items()}


def draft_tune(init: str | Path, run_dir: str | Path, train_cfg: TrainConfig, tasks: list[str] | None = None,
               prompts: list[Prompt] | None = None, num_prompts: int = 1024, eval_prompts: int = 32,
               max_tokens: int = 256, epochs: float | None = 3.0, max_batch: int = 32, soft: bool = False,
               resume: bool = False, device: str | None = None, price_per_hour: float | None = None,
               quiet: bool = False) -> dict[str, Any]:
    """Tune the MTP modules of the model at `init` on its own answers to `prompts` (or `num_prompts` train
    prompts of `tasks`); held-out acceptance is measured on `eval_prompts` others before and after. Returns a
    summary (also in receipt.json)."""
    from nanoseek import cost
    from nanoseek.infer.engine import Engine  # a sibling layer, loaded when a run starts (as sft and grpo do)

    say = (lambda *a: None) if quiet else print
    init_dir = resolve_model_dir(init)
    if not (init_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{init_dir} has no tokenizer.json; draft tuning needs the model's tokenizer")
    if prompts is not None:  # a file's prompts: hold out its last few (at most a tenth) to measure on
        n_eval = min(eval_prompts, len(prompts) // 10)
        if n_eval < 1:
            raise ValueError(f"{len(prompts)} prompts are too few: give at least 10 (a tenth is held out)")
        train_prompts, held_out = prompts[:-n_eval], prompts[-n_eval:]
    else:
        tasks = tasks or ["arithmetic", "countdown"]
        train_prompts, held_out = task_prompts(tasks, num_prompts, "train"), task_prompts(tasks, eval_prompts, "eval")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(train_cfg.seed)
    model = load_model(init_dir, dtype=torch.float32, device=device)
    if not model.mtp_modules:
        raise ValueError(f"{init_dir} has no MTP modules to tune (num_nextn_predict_layers = 0)")
    # seq_len only caps a row here (one answer per row, as long as the longest): never past the model's context
    train_cfg.seq_len = min(train_cfg.seq_len, model.config.max_position_embeddings - 1)
    tokenizer = Tokenizer.load(init_dir)
    run_dir = Path(run_dir)
    config = {"stage": "draft-tune", "init": str(init_dir), "tasks": tasks, "prompts": len(train_prompts),
              "eval_prompts": len(held_out), "max_tokens": max_tokens, "epochs": epochs, "soft": soft,
              "train": train_cfg.to_dict()}
    has_state = prepare_run(run_dir, config, resume)

    # 1. the model's own answers (kept, so a resumed run trains on the same ones) and the acceptance before
    t0 = time.perf_counter()
    engine = Engine(model, tokenizer=tokenizer, max_batch=max_batch)
    before = answer(engine, held_out, max_tokens, speculative=True, progress=not quiet)
    answers_file = run_dir / "answers.jsonl"
    if answers_file.exists():
        rows = [json.loads(line) for line in answers_file.read_text().splitlines() if line.strip()]
        train_examples = [(r["ids"], r["mask"]) for r in rows]
    else:
        train_examples = examples(answer(engine, train_prompts, max_tokens, speculative=False, progress=not quiet))
        atomic_write_text(answers_file, "".join(json.dumps({"ids": i, "mask": m}) + "\n" for i, m in train_examples))
    generation_seconds = time.perf_counter() - t0
    del engine
    say(f"before: {acceptance(before):.1%} of drafts accepted on {len(held_out)} held-out prompts; "
        f"{sum(map(sum, (m for _, m in train_examples))):,} answer tokens from {len(train_examples)} prompts to "
        f"train on")

    # 2. train the MTP modules alone on those answers
    ids, mask, truncated = one_per_row(train_examples, train_cfg.seq_len, tokenizer.pad_id)
    if not mask[:, 1:].any():
        raise ValueError(f"no answer token fits in --seq-len {train_cfg.seq_len} after its prompt; raise --seq-len")
    if epochs is not None and not (train_cfg.steps or train_cfg.tokens or train_cfg.minutes):
        train_cfg.steps = max(1, math.ceil(epochs * len(ids) / (train_cfg.batch_size * train_cfg.grad_accum)))
    train_cfg.validate()
    trainable = freeze_all_but_mtp(model)
    vi, vm, _ = one_per_row(examples(before), train_cfg.seq_len, tokenizer.pad_id)
    val = [tuple(t.to(device) for t in inputs_targets(vi[j:j + train_cfg.batch_size], vm[j:j + train_cfg.batch_size]))
           for j in range(0, len(vi), train_cfg.batch_size)][: train_cfg.eval_batches]
    say(f"training {trainable / 1e6:.2f}M MTP parameters of {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"on {len(ids)} answers, one per row of {ids.shape[1]} tokens"
        + (f" ({truncated} answers cut to fit)" if truncated else ""))
    device_key = cost.detect_device()
    dev = cost.get_device(device_key)
    precision = peak_precision(train_cfg.precision, torch.device(device), dev)
    # per token: the frozen model's forward, and the MTP modules' forward and backward
    main_forward = cost.flops_per_token(model.config, train_cfg.seq_len, training=False, include_mtp=False)
    mtp_forward = cost.flops_per_token(model.config, train_cfg.seq_len, training=False) - main_forward
    trainer = Trainer(model, train_cfg, run_dir, RowBatches(ids, mask, train_cfg.batch_size, train_cfg.seed),
                      partial(draft_loss, soft=soft), stage="draft-tune",
                      eval_fn=lambda m: held_out_draft_loss(val, m, soft),
                      flops_per_token=main_forward + 3 * mtp_forward, device_name=device_key,
                      peak_flops=dev.peak_flops(precision))
    if has_state:
        trainer.resume_latest()
        say(f"resumed {run_dir} at step {trainer.step}")
    final = trainer.fit()

    # 3. the acceptance after, on the same held-out prompts; the answers themselves must not have moved
    save_model(model, run_dir / "model", tokenizer=tokenizer)
    t1 = time.perf_counter()
    model.eval()
    after = answer(Engine(model, tokenizer=tokenizer, max_batch=max_batch), held_out, max_tokens, speculative=True,
                   progress=False)
    same = [o.token_ids for o in after] == [o.token_ids for o in before]
    result = {"held_out_prompts": len(held_out), "acceptance_before": acceptance(before),
              "acceptance_after": acceptance(after), "draft_tokens": len(model.mtp_modules), "same_output": same,
              "answers_trained": len(train_examples), "trainable_params": trainable}
    atomic_write_json(run_dir / "acceptance.json", result)
    if not same:
        warnings.warn("the held-out answers changed after draft tuning, though only the MTP modules trained; "
                      "please report this", stacklevel=2)
    # the device time is the answers' generation, the training and the two acceptance measurements
    receipt = cost.make_receipt("draft-tune", device_key, generation_seconds + trainer.elapsed +
                                time.perf_counter() - t1, trainer.tokens, trainer.tokens * trainer.flops_per_token,
                                precision=precision, price_per_hour=price_per_hour, steps=trainer.step,
                                params=sum(p.numel() for p in model.parameters()), val_loss=final.get("val_loss"))
    cost.write_receipt(receipt, run_dir / "receipt.json")
    say(f"after: {acceptance(after):.1%} of drafts accepted (before {acceptance(before):.1%})"
        + (", the same output" if same else ", OUTPUT CHANGED") + f"; model in {run_dir / 'model'}")
    return {"run": str(run_dir), "steps": trainer.step, **result, **receipt.to_dict()}

"""The training subcommands: pretrain, sft, grpo, distill, draft-tune, and the speedrun that chains them."""

from __future__ import annotations

import argparse

from nanoseek.cli.common import UsageError, add_training_flags, stage_train_config, train_config

# ---------------------------------------------------------------------------------------------- pretrain
def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model (next-token + MTP) on text or the built-in corpus",
                       description="Pretrain from a preset on text/JSONL/parquet files or the built-in reasoning "
                                   "corpus ('builtin'). Trains a tokenizer unless --tokenizer is given, tokenises "
                                   "into shards under the run directory, and writes checkpoints, metrics.jsonl, "
                                   "the final model (Hugging Face layout) and receipt.json.")
    p.add_argument("--preset", default="tiny", help="model preset: smoke, tiny, dN, ... (default tiny)")
    p.add_argument("--data", nargs="+", default=["builtin"], metavar="PATH",
                   help="text/JSONL/parquet files or directories, or 'builtin[:N]' (default builtin)")
    p.add_argument("--tokenizer", help="an existing tokenizer directory (default: train one on the data)")
    add_training_flags(p)
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from nanoseek.config import preset
    from nanoseek.train.pretrain import DataConfig, pretrain

    train_cfg, model_sets = train_config(args)
    model_cfg = preset(args.preset).with_overrides(model_sets)
    data = DataConfig(paths=args.data, tokenizer=args.tokenizer)
    pretrain(model_cfg, train_cfg, data, args.run, resume=args.resume, price_per_hour=args.price,
             ep_size=args.ep_size)
    return 0


# ---------------------------------------------------------------------------------------------- sft
def _add_sft(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on chat conversations (loss on assistant tokens)",
                       description="Fine-tune a model on a JSONL of OpenAI-format conversations ({\"messages\": "
                                   "[...]}), loss on assistant tokens only, conversations packed whole into rows.")
    p.add_argument("--init", required=True, metavar="MODEL", help="the model to start from (model or run directory)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="conversations: one {\"messages\": [...]} per line")
    p.add_argument("--epochs", type=float, default=3.0,
                   help="passes over the data when no --steps/--tokens/--minutes is given (default 3)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="conversations held out for val_loss (default 0.05)")
    add_training_flags(p)
    p.set_defaults(func=_cmd_sft)


def _cmd_sft(args: argparse.Namespace) -> int:
    from nanoseek.train.sft import TRAIN_DEFAULTS, sft

    train_cfg = stage_train_config(args, TRAIN_DEFAULTS, epochs_decide=True)
    sft(args.init, args.data, args.run, train_cfg, resume=args.resume, epochs=args.epochs,
        val_fraction=args.val_fraction, price_per_hour=args.price)
    return 0


# ---------------------------------------------------------------------------------------------- grpo
def _add_grpo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grpo", help="reinforcement learning with verifiable rewards (GRPO, Dr. GRPO, DAPO)",
                       description="GRPO from a model: G samples per prompt from the live policy, rewards from the "
                                   "task verifier (or --reward module:function), group-relative advantages, the "
                                   "clipped surrogate with optional k3 KL. Logs reward, accuracy, length, KL, clip "
                                   "fraction, entropy, rollout vs update time, and held-out eval_accuracy.")
    p.add_argument("--init", required=True, metavar="MODEL", help="the model to start from (model or run directory)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="task for prompts (train split) and rewards: arithmetic, countdown")
    src.add_argument("--data", metavar="FILE.jsonl", help="prompts: rows {\"prompt\", \"answer\"?, ...}")
    p.add_argument("--difficulty", help="task difficulty, or a mix like 3,4 (default: the task's)")
    p.add_argument("--reward", metavar="MODULE:FUNCTION",
                   help="reward callable (prompts, completions, **columns) -> list[float] (default: the verifier)")
    p.add_argument("--format-weight", type=float, default=0.0,
                   help="verifier reward for a well-formed completion (R1: 1.0, equal to accuracy; default 0)")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt, G (default 8)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts per rollout batch (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="completion length cap (default 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus mass (default 1.0)")
    p.add_argument("--beta", type=float, default=0.0, help="k3 KL weight to the initial model; 0 keeps none (default)")
    p.add_argument("--loss-type", default="dapo", help="grpo | dr_grpo | dapo | bnpo (default dapo, as TRL)")
    p.add_argument("--epsilon", type=float, default=0.2, help="clip range, low side (default 0.2)")
    p.add_argument("--epsilon-high", type=float, default=None, help="clip range, high side (DAPO: 0.28; default = epsilon)")
    p.add_argument("--num-iterations", type=int, default=1, help="optimizer passes per rollout batch (default 1)")
    p.add_argument("--scale-rewards", default=None,
                   help="group | batch | none (default: none for dr_grpo, else group)")
    p.add_argument("--dynamic-sampling", action="store_true",
                   help="drop groups whose rewards are all equal and sample more prompts (DAPO)")
    p.add_argument("--max-sampling-rounds", type=int, default=4, help="generation rounds per batch at most (default 4)")
    p.add_argument("--overlong", default="none", help="truncated completions: none | mask | penalty (default none)")
    p.add_argument("--overlong-buffer", type=int, default=None, help="penalty ramp length in tokens (default max/4)")
    p.add_argument("--eval-num", type=int, default=64, help="held-out problems for eval_accuracy (0 = off; default 64)")
    p.add_argument("--eval-difficulty", default=None, help="difficulty of the held-out problems (default --difficulty)")
    p.add_argument("--eval-samples", type=int, default=0,
                   help="also log R1's sampled pass@1 (temperature 0.6, top-p 0.95) over this many samples per "
                        "problem (default 0: greedy only)")
    p.add_argument("--max-batch", type=int, default=256,
                   help="sequences the engine decodes together in rollouts and evaluation (default 256; its latent "
                        "cache holds this many x (256 + max new tokens) tokens)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    add_training_flags(p)
    p.set_defaults(func=_cmd_grpo)


def _cmd_grpo(args: argparse.Namespace) -> int:
    from nanoseek.train.grpo import TRAIN_DEFAULTS, GRPOConfig, grpo

    train_cfg = stage_train_config(args, TRAIN_DEFAULTS)
    cfg = GRPOConfig(task=args.task, data=args.data, difficulty=args.difficulty, reward=args.reward,
                     format_weight=args.format_weight, group_size=args.group_size,
                     prompts_per_step=args.prompts_per_step, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, beta=args.beta, loss_type=args.loss_type,
                     epsilon=args.epsilon, epsilon_high=args.epsilon_high, num_iterations=args.num_iterations,
                     scale_rewards=args.scale_rewards, dynamic_sampling=args.dynamic_sampling,
                     max_sampling_rounds=args.max_sampling_rounds, overlong=args.overlong,
                     overlong_buffer=args.overlong_buffer, eval_num=args.eval_num,
                     eval_difficulty=args.eval_difficulty, eval_samples=args.eval_samples, max_batch=args.max_batch,
                     seed=args.seed or 0).validate()
    grpo(args.init, args.run, cfg, train_cfg, resume=args.resume, device=args.device, price_per_hour=args.price)
    return 0


# ---------------------------------------------------------------------------------------------- distill
def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distil a teacher's verified reasoning traces into a (smaller) student",
                       description="Rejection sampling + SFT (R1 section 2.4): the teacher answers --num-prompts "
                                   "train prompts --samples times, only verified-correct, well-formed answers are "
                                   "kept (RUN/traces.jsonl), and the student is fine-tuned on them (RUN/student). "
                                   "The student is --student-init (a smaller pretrained model), or a --student-preset "
                                   "pretrained first for --student-pretrain-steps on the built-in corpus with the "
                                   "teacher's tokenizer (a student from scratch learns nothing from a few hundred "
                                   "traces).")
    p.add_argument("--teacher", required=True, metavar="MODEL", help="the teacher (model or run directory)")
    p.add_argument("--task", required=True, help="task for prompts and the verifier: arithmetic, countdown")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--student-init", metavar="MODEL", help="the student to fine-tune (any tokenizer: traces are text)")
    who.add_argument("--student-preset", metavar="P", help="a preset (e.g. d4) to pretrain as the student first")
    p.add_argument("--student-pretrain-steps", type=int, default=300, help="pretraining steps for --student-preset")
    p.add_argument("--difficulty", help="task difficulty or a mix like 3,4 (default: the task's)")
    p.add_argument("--samples", type=int, default=4, help="teacher samples per prompt, K (default 4)")
    p.add_argument("--num-prompts", type=int, default=256, help="train prompts to answer (default 256)")
    p.add_argument("--per-prompt", type=int, default=1, help="distinct correct traces kept per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=0.7, help="teacher sampling temperature (default 0.7)")
    p.add_argument("--max-tokens", type=int, default=512, help="teacher completion cap (default 512)")
    p.add_argument("--epochs", type=float, default=3.0, help="SFT passes over the traces (default 3)")
    add_training_flags(p)
    p.set_defaults(func=_cmd_distill)


def _cmd_distill(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nanoseek.checkpoint import resolve_model_dir
    from nanoseek.train.sft import TRAIN_DEFAULTS, distill

    if args.samples < 1 or args.num_prompts < 1:
        raise UsageError("--samples and --num-prompts must be >= 1")
    train_cfg = stage_train_config(args, TRAIN_DEFAULTS, epochs_decide=True)
    teacher = resolve_model_dir(args.teacher)
    student = args.student_init
    if args.student_preset:
        from nanoseek.config import preset
        from nanoseek.train.loop import TrainConfig
        from nanoseek.train.pretrain import DataConfig, pretrain

        base = Path(args.run) / "student_base"
        if not (base / "model" / "config.json").exists():
            pretrain(preset(args.student_preset), TrainConfig(steps=args.student_pretrain_steps, batch_size=16,
                                                              seq_len=256, seed=args.seed or 1337),
                     DataConfig(paths=["builtin"], tokenizer=str(teacher)), base)
        student = base
    distill(teacher, args.run, args.task, student, train_cfg, samples=args.samples, num_prompts=args.num_prompts,
            difficulty=args.difficulty, temperature=args.temperature, max_tokens=args.max_tokens,
            per_prompt=args.per_prompt, epochs=args.epochs, seed=args.seed or 0, price_per_hour=args.price)
    return 0


# ---------------------------------------------------------------------------------------------- draft-tune
def _add_draft_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("draft-tune", help="train the MTP modules on the model's own answers: more drafts accepted",
                       description="Raise MTP speculation's acceptance rate: the model answers prompts like the ones "
                                   "it will serve (greedy), and only its MTP modules are trained to predict those "
                                   "answers; the main model is frozen, so its output does not change. Reports the "
                                   "acceptance on held-out prompts before and after (RUN/acceptance.json); the tuned "
                                   "model is RUN/model.")
    p.add_argument("--init", required=True, metavar="MODEL", help="the model to tune (model or run directory)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", default="arithmetic,countdown",
                     help="tasks whose train prompts to answer, in turn; held-out prompts from their eval split "
                          "(default arithmetic,countdown)")
    src.add_argument("--prompts", metavar="FILE", help="prompts to answer instead: .txt (one per line) or .jsonl "
                                                       "(\"prompt\" or \"messages\"); the last tenth (at most "
                                                       "--eval-prompts) is held out")
    p.add_argument("--chat", action="store_true", help="with --prompts: wrap text prompts in the chat template")
    p.add_argument("--num-prompts", type=int, default=1024, help="task prompts to answer (default 1024)")
    p.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts for the acceptance (default 32)")
    p.add_argument("--max-tokens", type=int, default=256, help="answer length cap (default 256)")
    p.add_argument("--epochs", type=float, default=3.0,
                   help="passes over the answers when no --steps/--tokens/--minutes is given (default 3)")
    p.add_argument("--max-batch", type=int, default=32, help="prompts the engine answers together (default 32)")
    p.add_argument("--soft-targets", action="store_true",
                   help="learn the model's whole next-token distribution, not just its greedy token (for sampled "
                        "decoding; for greedy decoding the tokens did slightly better)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    add_training_flags(p)
    p.set_defaults(func=_cmd_draft_tune)


def _cmd_draft_tune(args: argparse.Namespace) -> int:
    from nanoseek.cli.use import read_prompts
    from nanoseek.train.draft_tune import TRAIN_DEFAULTS, draft_tune

    if args.num_prompts < 1 or args.eval_prompts < 1 or args.max_tokens < 1 or args.max_batch < 1:
        raise UsageError("--num-prompts, --eval-prompts, --max-tokens and --max-batch must be >= 1")
    train_cfg = stage_train_config(args, TRAIN_DEFAULTS, epochs_decide=True)
    prompts = None
    if args.prompts:
        prompts = [(prompt, chat or args.chat) for prompt, chat, _ in read_prompts(args.prompts)]
    tasks = None if prompts else [t.strip() for t in args.task.split(",") if t.strip()]
    draft_tune(args.init, args.run, train_cfg, tasks=tasks, prompts=prompts, num_prompts=args.num_prompts,
               eval_prompts=args.eval_prompts, max_tokens=args.max_tokens, epochs=args.epochs,
               max_batch=args.max_batch, soft=args.soft_targets, resume=args.resume, device=args.device,
               price_per_hour=args.price)
    return 0


# ---------------------------------------------------------------------------------------------- speedrun
def _add_speedrun(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("speedrun", help="the whole recipe in one command: pretrain -> SFT -> GRPO -> eval -> report",
                       description="Train a small reasoning model from nothing on the built-in tasks: tokenizer, "
                                   "pretraining (MLA + MoE + MTP), SFT, GRPO, held-out evaluation after each stage, "
                                   "and a report card with the cost. Re-running the same command resumes.")
    p.add_argument("--minutes", type=float, help="wall-clock budget (default 30)")
    p.add_argument("--budget-usd", type=float, help="a dollar budget, turned into time at --device's price")
    p.add_argument("--device", help="device to price the run at (default: this machine's)")
    p.add_argument("--price", type=float, help="dollars per device-hour (default: the catalogue's)")
    p.add_argument("--preset", help="model preset (default: tiny on a CPU; 'smoke' checks the pipeline in minutes)")
    p.add_argument("--task", help="the verifiable task to reason about: countdown (default) or arithmetic")
    p.add_argument("--run", default="runs/speedrun", help="output directory (default runs/speedrun)")
    p.add_argument("--workers", type=int, help="pretraining processes (default on a CPU: one single-threaded "
                                               "process per core, data parallel; 1 = one process)")
    p.set_defaults(func=_cmd_speedrun)


def _cmd_speedrun(args: argparse.Namespace) -> int:
    from nanoseek.speedrun import make_plan, run_speedrun

    if args.minutes is not None and args.budget_usd is not None:
        raise UsageError("give --minutes or --budget-usd, not both")
    plan = make_plan(args.minutes, args.budget_usd, args.device, args.preset, args.task, args.price, args.workers)
    run_speedrun(plan, args.run)
    return 0

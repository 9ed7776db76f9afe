"""A run is a directory (ARCHITECTURE decision 4). This file guards it: one run per directory, resumable only
with the config it was started with, and the resolved config written first so the run can be re-created."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nanoseek.checkpoint import atomic_write_json
from nanoseek.train.loop import checkpoint_dirs

# Limits may change on resume (train longer); everything else must match.
_RESUMABLE_CHANGES = {"steps", "tokens", "minutes", "eval_every", "checkpoint_every", "keep_checkpoints",
                      "log_every", "eval_batches"}


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(config))  # deep copy, tuples -> lists, as it would read back from disk
    for k in _RESUMABLE_CHANGES:
        out.get("train", {}).pop(k, None)
    return out


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
            if d:
                return d
        return None
    return None if a == b else f"{path}: {a!r} in the run, {b!r} now"


def prepare_run(run_dir: str | Path, config: dict[str, Any], resume: bool) -> bool:
    """Check `run_dir` can take this run and write its config.json. Returns True if there is state to resume.

    A directory holding a different run is never touched; `--resume` against a run of another config is refused.
    """
    run_dir = Path(run_dir)
    existing = run_dir / "config.json"
    has_checkpoints = bool(checkpoint_dirs(run_dir))
    if existing.exists():
        try:
            old = json.loads(existing.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{existing} is not valid JSON; move the directory away or choose another --run") from None
        diff = _first_difference(_comparable(old), _comparable(config))
        if diff and resume:
            raise ValueError(f"cannot --resume {run_dir}: it was started with another config ({diff}); "
                             f"drop the changed flags or choose another --run")
        if diff:
            raise FileExistsError(f"{run_dir} already holds a different run ({diff}); choose another --run "
                                  f"or delete that directory")
        if not resume and has_checkpoints:
            raise FileExistsError(f"{run_dir} already holds this run's checkpoints; pass --resume to continue it "
                                  f"or choose another --run")
    elif resume:
        raise FileNotFoundError(f"nothing to resume in {run_dir}: it has no config.json; drop --resume to start")
    elif run_dir.exists() and any(p for p in run_dir.iterdir() if not p.name.startswith(".")):
        raise FileExistsError(f"{run_dir} exists and is not a nanoseek run; choose another --run")
    atomic_write_json(run_dir / "config.json", config)
    return resume and has_checkpoints

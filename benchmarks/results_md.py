"""What the benchmarks share: each owns one `## ...` section of benchmarks/RESULTS.md and replaces only that
section; and the device and thread set-up they all start with."""

import re
from pathlib import Path

from nanoseek.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(heading: str, text: str, path: Path = RESULTS) -> None:
    """Put `text` (which starts with `heading`) in place of the old section, up to the next `## ` heading, or
    append it; every other section stays as it was. Atomic, so a reader never sees half a file."""
    old = path.read_text() if path.exists() and path.read_text().strip() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    body = text.rstrip("\n") + "\n\n"
    new = pattern.sub(lambda _: body, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + body
    atomic_write_text(path, new.rstrip("\n") + "\n")


def publish(heading: str, text: str, write: bool = True, path: Path = RESULTS) -> None:
    """Print a benchmark's section and, with `write`, put it in RESULTS.md (see `write_section`)."""
    print(text)
    if write:
        write_section(heading, text, path)
        print(f"wrote {heading!r} in {path}")


def set_up(script: str, device: str, threads: int | None) -> bool:
    """Check that --device exists here (else one line and False: the caller exits 2) and apply --threads."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"{script}: --device cuda but no CUDA GPU here; leave --device out to run on the CPU")
        return False
    if threads:
        torch.set_num_threads(threads)
    return True

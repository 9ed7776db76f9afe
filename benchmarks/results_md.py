"""Each benchmark owns one `## ...` section of benchmarks/RESULTS.md and replaces only that section."""

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

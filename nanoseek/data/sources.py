"""Where training text comes from: plain text, JSONL, parquet, directories of them, or the built-in task corpus.

`read_documents(paths)` turns a list of paths into one stream of documents (strings). What counts as a document
matters: the shard builder separates documents with an end-of-text token and assigns each whole document to
either the training or the held-out split, so a document is the unit that never leaks between the two.

- `.txt` / `.md`: the whole file is one document, unless it is larger than `LARGE_TEXT_BYTES` (1 MiB). A file
  that big is almost always a dump of many documents, so it is read as a stream and split on blank lines
  (one or more empty lines end a document). Reading it whole would also hold gigabytes in memory.
- `.jsonl`: one JSON object per line; the document is the string under `text_field` (default "text").
- `.parquet`: a string column named `text_field`, read in record batches (needs pyarrow).
- a directory: every supported file under it, recursively, in sorted order (so the stream is deterministic);
  hidden files and folders (".git", ...) and unsupported files inside a directory are skipped.
- `builtin`, `builtin:N`, `builtin:N:TASK[,TASK]` or `builtin:TASK`: N documents (default
  `DEFAULT_BUILTIN_DOCS`) from the verifiable tasks (default all of them), so the default run needs no download.

Empty or whitespace-only documents are skipped everywhere. Errors are one sentence naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES

LARGE_TEXT_BYTES = 1 << 20  # above this a text file is split into documents on blank lines
DEFAULT_BUILTIN_DOCS = 20_000
BUILTIN = "builtin"


def read_documents(paths: list[str], text_field: str = "text", *, seed: int = 0,
                   builtin_docs: int = DEFAULT_BUILTIN_DOCS) -> Iterator[str]:
    """Yield every document in `paths`, in order. `seed` only affects the built-in task corpus.

    Paths are checked up front (so a typo fails before any work is done); a stream that ends up with no
    documents at all raises at its end, since only then do we know.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]  # a single path is an easy mistake to forgive
    if not paths:
        raise ValueError("No data paths given; pass at least one file, directory, or 'builtin'.")
    plan = [_plan(str(p), builtin_docs) for p in paths]  # validates every path now, before any reading
    return _stream(plan, paths, text_field, seed)


def _stream(plan, paths, text_field: str, seed: int) -> Iterator[str]:
    count = 0
    for kind, target in plan:
        if kind == BUILTIN:
            docs = _read_builtin(target, seed)
        else:
            docs = _read_file(target, text_field)
        for doc in docs:
            if doc.strip():
                count += 1
                yield doc
    if count == 0:
        raise ValueError(f"No documents found in {_join(paths)}: every input is empty; add text or check the paths.")


def describe_sources(paths: list[str], text_field: str = "text", *, seed: int = 0,
                     builtin_docs: int = DEFAULT_BUILTIN_DOCS) -> str:
    """A one-line description of the inputs that changes whenever their content may have changed.

    Used as the shard cache key: it names the inputs for people and ends with a hash of every file's path,
    size and modification time (cheap: no file is read), the text field and the builtin seed.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    h = hashlib.sha256(f"text_field={text_field}\0seed={seed}\0".encode())
    names, files, size = [], 0, 0
    for p in paths:
        kind, target = _plan(str(p), builtin_docs)
        names.append(str(p))
        if kind == BUILTIN:
            h.update(f"builtin:{target}\0".encode())
            continue
        for f in _expand(Path(target)):
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            files += 1
            size += st.st_size
    extra = f" ({files} files, {size:,} bytes, field {text_field!r})" if files else ""
    return f"{_join(names)}{extra} seed={seed} @{h.hexdigest()[:16]}"


# --------------------------------------------------------------------------------------------- path handling


def _plan(path: str, builtin_docs: int = DEFAULT_BUILTIN_DOCS) -> tuple[str, object]:
    """Check one input path and say how to read it: ('builtin', (N, tasks or None)) or ('file', Path)."""
    if path == BUILTIN or path.startswith(BUILTIN + ":"):
        return BUILTIN, _builtin_spec(path, builtin_docs)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"Data path {path} does not exist; check the path (or use 'builtin' for the task corpus).")
    if p.is_dir():
        if not _expand(p):
            raise ValueError(f"Directory {path} holds no supported data files ({', '.join(SUPPORTED_SUFFIXES)}).")
        return "file", p
    if p.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise ValueError(
            f"Unknown data format {p.suffix or '(no extension)'!r} for {path}; "
            f"supported are {', '.join(SUPPORTED_SUFFIXES)}, a directory of them, or 'builtin'."
        )
    return "file", p


def _builtin_spec(path: str, default_docs: int) -> tuple[int, tuple[str, ...] | None]:
    """'builtin[:N][:TASK,...]' -> (N, tasks); N defaults to `default_docs`, tasks None means every task."""
    from nanoseek.data.tasks import TASKS

    fields = path.split(":")[1:]
    n, tasks = default_docs, None
    if fields and fields[0].isdigit() and int(fields[0]) > 0:
        n = int(fields.pop(0))
    if fields and all(name in TASKS for name in fields[0].split(",")):
        tasks = tuple(fields.pop(0).split(","))
    if fields:
        raise ValueError(f"Bad data path {path!r}: write 'builtin', 'builtin:N' or 'builtin:N:TASK[,TASK]' with N a "
                         f"positive document count and tasks from {', '.join(sorted(TASKS))}.")
    return n, tasks


def _expand(path: Path) -> list[Path]:
    """A file is itself; a directory is its supported, non-hidden files, recursively and sorted."""
    if not path.is_dir():
        return [path]
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # pruned in place, so os.walk skips them
        found += [Path(root) / n for n in files if not n.startswith(".") and Path(n).suffix.lower() in SUPPORTED_SUFFIXES]
    return sorted(found)  # by path components: deterministic whatever order the file system lists


def _join(paths) -> str:
    names = [str(p) for p in paths]
    return ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:3])} and {len(names) - 3} more"


# --------------------------------------------------------------------------------------------- readers


def _read_file(target: Path, text_field: str) -> Iterator[str]:
    for f in _expand(target):
        suffix = f.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            yield from _read_text(f)
        elif suffix in JSONL_SUFFIXES:
            yield from _read_jsonl(f, text_field)
        else:
            yield from _read_parquet(f, text_field)


def _read_text(path: Path) -> Iterator[str]:
    try:
        if path.stat().st_size <= LARGE_TEXT_BYTES:
            yield path.read_text(encoding="utf-8").rstrip()
            return
        # A large file: stream it and cut documents at blank lines.
        para: list[str] = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    para.append(line)
                elif para:
                    yield "".join(para).rstrip()
                    para = []
        if para:
            yield "".join(para).rstrip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8.") from None


def read_jsonl_rows(path: str | os.PathLike, what: str = "file") -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file, with one clear error for a missing file,
    bad JSON, a line that is not an object, or bytes that are not UTF-8. Callers check their own fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {lineno} is not valid JSON ({e.msg}); fix or remove that line.") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path} line {lineno} is a JSON {type(record).__name__}, not an object.")
                yield lineno, record
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8.") from None


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for lineno, record in read_jsonl_rows(path):
        if text_field not in record:
            keys = ", ".join(map(str, record))
            raise ValueError(f"{path} line {lineno} has no {text_field!r} field (found: {keys or 'nothing'}); "
                             f"pass the right text field name.")
        text = record[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise ValueError(f"{path} line {lineno}: field {text_field!r} is a {type(text).__name__}, not a string.")
        yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"Reading {path} needs pyarrow; install it with `pip install pyarrow`.") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path} is not a readable parquet file ({e}).") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path} has no column {text_field!r} (columns: {', '.join(names)}); pass the right text field name.")
    col_type = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise ValueError(f"{path}: column {text_field!r} has type {col_type}, not string.")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def _read_builtin(spec: tuple[int, tuple[str, ...] | None], seed: int) -> Iterator[str]:
    # Imported here: the tasks package is only needed when someone asks for the built-in corpus.
    from nanoseek.data.tasks import builtin_corpus

    num_docs, tasks = spec
    yield from builtin_corpus(num_docs, seed, tasks=tasks)

"""Tokenised shards on disk, and the packed, resumable, rank-aware batch loader that reads them.

On disk a shard directory looks like this (nanoGPT-style flat token files, described by one JSON file):

    meta.json            format, version, dtype, vocab_size, bos/eos ids, source, fingerprint, per-split counts
    train_000000.bin     raw little-endian token ids (uint16 when vocab_size <= 65536, else uint32), no header
    train_000001.bin     every shard holds exactly `shard_tokens` tokens except the last of its split
    val_000000.bin       the held-out split, same layout

Each split is one token stream: every document becomes `[bos] tokens [eos]` (bos only if given), and documents
follow one another; shards are just that stream cut into fixed-size files, so a document may span two of them.
A document goes to train or val by a hash of its text (salted with the seed), so the split is deterministic,
independent of document order and of the number of workers, and two copies of one text always land together.

Atomicity: everything is written into a hidden sibling directory, fsynced, and renamed into place at the end,
with meta.json written last. A crash leaves no shard file in the output directory, only a hidden `.partial`
directory that the next build clears. Under torchrun only rank 0 should build; the others wait at a barrier
and then call `load_shards`.

`PackedLoader` cuts a split's stream into windows of seq_len + 1 tokens (window w starts at token w * seq_len,
so consecutive windows share one token and every token is a target exactly once per epoch), shuffles the window
order once per epoch, and hands out global batches of batch_size * world_size windows, rank r taking every
world_size-th window of each. Its position is two integers, so resuming mid-epoch is exact.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import multiprocessing
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nanoseek.atomic import atomic_write_json, fsync_dir

FORMAT = "nanoseek-shards"
VERSION = 1
META = "meta.json"
SPLITS = ("train", "val")

# Documents travel to the workers in chunks big enough to amortise the inter-process hop.
CHUNK_DOCS = 512
CHUNK_CHARS = 1 << 20


# --------------------------------------------------------------------------------------------- encoders


class TokenizerEncoder:
    """A picklable `encode` for a saved tokenizer directory (the one holding `tokenizer.json`).

    It pickles as its path alone and loads the tokenizer lazily, so each worker process loads its own copy
    instead of receiving a Rust object through a pipe. Its `fingerprint` is a hash of tokenizer.json, so
    shards are rebuilt when the tokenizer is retrained.
    """

    def __init__(self, tokenizer_dir: str | os.PathLike):
        path = Path(tokenizer_dir)
        self.path = path if path.suffix == ".json" else path / "tokenizer.json"
        if not self.path.is_file():
            raise FileNotFoundError(f"No tokenizer at {self.path}; train one with `nanoseek tokenizer train`.")
        self._tok = None

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path, self._tok = state["path"], None

    @property
    def tokenizer(self):
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(self.path))
        return self._tok

    def __call__(self, text: str) -> list[int]:
        # Special tokens (bos/eos) are added by the shard builder, not by the tokenizer's post-processor.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise ValueError(f"The tokenizer at {self.path} has no token {token!r}.")
        return tid

    @property
    def fingerprint(self) -> str:
        return "tokenizer.json sha256=" + hashlib.sha256(self.path.read_bytes()).hexdigest()


def _encoder_id(encode: Callable) -> str:
    """What identifies an encoder in the cache key. A repr holding a memory address just disables reuse (safe)."""
    fp = getattr(encode, "fingerprint", None)
    if isinstance(fp, str):
        return fp
    if hasattr(encode, "__qualname__"):
        return f"{encode.__module__}.{encode.__qualname__}"
    return f"{type(encode).__module__}.{type(encode).__qualname__}:{encode!r}"


class _DocEncoder:
    """Turns a chunk of texts into (split keys, per-document lengths, tokens). Runs inside the pool workers."""

    def __init__(self, encode, *, bos_id, eos_id, vocab_size, dtype, seed):
        self.encode, self.bos_id, self.eos_id = encode, bos_id, eos_id
        self.vocab_size, self.dtype = vocab_size, dtype
        self.salt = f"nanoseek-split:{seed}\0".encode()

    def __call__(self, texts: list[str]):
        keys, lengths, pieces = [], [], []
        head = [] if self.bos_id is None else [self.bos_id]
        for text in texts:
            ids = np.asarray(head + list(self.encode(text)) + [self.eos_id], dtype=np.int64)
            if ids.min() < 0 or ids.max() >= self.vocab_size:
                bad = int(ids.max()) if ids.max() >= self.vocab_size else int(ids.min())
                raise ValueError(f"The tokenizer produced token id {bad}, outside vocab_size={self.vocab_size}; "
                                 f"pass the tokenizer's full vocabulary size.")
            keys.append(hashlib.blake2b(self.salt + text.encode("utf-8"), digest_size=16).digest())
            lengths.append(len(ids))
            pieces.append(ids.astype(self.dtype))
        return keys, lengths, np.concatenate(pieces)


_WORKER: _DocEncoder | None = None


def _init_worker(doc_encoder: _DocEncoder) -> None:
    global _WORKER
    _WORKER = doc_encoder


def _work(texts: list[str]):
    return _WORKER(texts)


def _chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for doc in documents:
        if not isinstance(doc, str):
            raise TypeError(f"Documents must be strings, got a {type(doc).__name__}.")
        if not doc.strip():
            continue
        chunk.append(doc)
        chars += len(doc)
        if len(chunk) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encode_all(chunks: Iterator[list[str]], doc_encoder: _DocEncoder, num_workers: int):
    """Encoded chunks in input order. At most 2 * num_workers chunks are in flight, so memory stays bounded
    however large the corpus (Pool.imap would read the whole input ahead)."""
    if num_workers <= 1:
        for chunk in chunks:
            yield doc_encoder(chunk)
        return
    with multiprocessing.get_context().Pool(num_workers, _init_worker, (doc_encoder,)) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_work, (chunk,)))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# --------------------------------------------------------------------------------------------- writing


class _SplitWriter:
    """Appends tokens to one split's stream, cutting it into files of exactly `shard_tokens` tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.files: list[str] = []
        self.file_tokens: list[int] = []
        self.documents = 0
        self.tokens = 0
        self._f = None

    def add(self, tokens: np.ndarray) -> None:
        self.documents += 1
        self.tokens += len(tokens)
        while len(tokens):
            if self._f is None:
                self.files.append(f"{self.split}_{len(self.files):06d}.bin")
                self.file_tokens.append(0)
                self._f = open(self.directory / self.files[-1], "wb")
            room = self.shard_tokens - self.file_tokens[-1]
            part, tokens = tokens[:room], tokens[room:]
            self._f.write(part.tobytes())
            self.file_tokens[-1] += len(part)
            if self.file_tokens[-1] == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None

    def meta(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens,
                "shards": [{"file": f, "tokens": n} for f, n in zip(self.files, self.file_tokens)]}


class _Splitter:
    """Routes each document to train or val by its hash key u in [0, 1).

    Documents with u < threshold go to val. To guarantee at least `floor` distinct val documents (so a small
    corpus still has a held-out set, or to ask for an exact count), the `floor` lowest-u other documents are held
    back in memory until the floor is met by hash alone; at the end the missing ones are promoted to val and
    the rest written to train (so a few train documents may come later than their input order). Copies of one text share a
    key, so they are always routed together and train and val never share a text.
    """

    def __init__(self, train: _SplitWriter, val: _SplitWriter, threshold: float, floor: int):
        self.train, self.val, self.threshold, self.floor = train, val, threshold, floor
        self.val_keys: set[bytes] = set()
        self.held: dict[bytes, tuple[float, list[np.ndarray]]] = {}
        self.heap: list[tuple[float, bytes]] = []  # (-u, key): the highest held u on top, ready for eviction

    def add(self, key: bytes, tokens: np.ndarray) -> None:
        u = int.from_bytes(key[:8], "little") / 2**64
        if u < self.threshold:
            self.val.add(tokens)
            self.val_keys.add(key)
            if self.held and len(self.val_keys) >= self.floor:
                self._release()  # the floor is met by hash alone: held documents go back to train now
        elif len(self.val_keys) >= self.floor:
            self.train.add(tokens)
        elif key in self.held:
            self.held[key][1].append(tokens)
        elif len(self.held) < self.floor:
            self._hold(u, key, tokens)
        elif self.heap and u < -self.heap[0][0]:
            _, evicted = heapq.heappop(self.heap)
            for t in self.held.pop(evicted)[1]:
                self.train.add(t)
            self._hold(u, key, tokens)
        else:
            self.train.add(tokens)

    def _hold(self, u: float, key: bytes, tokens: np.ndarray) -> None:
        self.held[key] = (u, [tokens])
        heapq.heappush(self.heap, (-u, key))

    def finish(self) -> None:
        need = max(0, self.floor - len(self.val_keys))
        self._release(promote=need)

    def _release(self, promote: int = 0) -> None:
        """Write out the held documents: the `promote` lowest-u ones to val (but never leave train without a
        document), the rest to train, in u order."""
        ordered = sorted(self.held.values(), key=lambda item: item[0])
        for i, (_, copies) in enumerate(ordered):
            last_for_train = self.train.documents == 0 and i == len(ordered) - 1
            target = self.val if i < promote and not last_for_train else self.train
            for t in copies:
                target.add(t)
        self.held.clear()
        self.heap.clear()


def build_shards(documents: Iterable[str], encode: Callable[[str], list[int]], out_dir: str | os.PathLike, *,
                 eos_id: int, bos_id: int | None = None, vocab_size: int, shard_tokens: int = 2**24,
                 val_fraction: float = 0.01, val_docs: int | None = None, num_workers: int | None = None,
                 seed: int = 0, source: str = "", overwrite: bool = False, progress: bool = True) -> ShardInfo:
    """Tokenise `documents` in parallel into shards under `out_dir` and return their `ShardInfo`.

    `encode` must be picklable (a module-level function, or `TokenizerEncoder(dir)`), since worker processes
    receive it. Held-out split: each document goes to val with probability `val_fraction`, by hash, and at least
    one goes there whenever there are two or more; `val_docs=N` instead asks for exactly N distinct documents.
    `source` names the input (use `sources.describe_sources`); when `out_dir` already holds complete shards
    built from the same source, encoder and settings, they are reused without reading `documents`. Shards of
    anything else are replaced only with `overwrite=True`.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if val_docs is not None and val_docs < 0:
        raise ValueError(f"val_docs must be >= 0, got {val_docs}.")
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}.")
    for name, tid in (("eos_id", eos_id), ("bos_id", bos_id)):
        if tid is not None and not 0 <= tid < vocab_size:
            raise ValueError(f"{name}={tid} is outside the vocabulary of {vocab_size} tokens.")
    dtype = np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")
    if val_docs is not None:
        threshold, floor = 0.0, val_docs
    else:
        threshold, floor = val_fraction, 1 if val_fraction > 0 else 0
    settings = {"format": FORMAT, "version": VERSION, "source": source, "encoder": _encoder_id(encode),
                "eos_id": eos_id, "bos_id": bos_id, "vocab_size": vocab_size, "dtype": dtype.name,
                "shard_tokens": shard_tokens, "val_fraction": val_fraction, "val_docs": val_docs, "seed": seed}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    out = Path(out_dir)
    reusable = _check_existing(out, fingerprint if source else None, overwrite)
    if reusable is not None:
        return reusable

    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by a build that crashed
    partial.mkdir(parents=True)
    try:
        writers = {s: _SplitWriter(partial, s, dtype, shard_tokens) for s in SPLITS}
        splitter = _Splitter(writers["train"], writers["val"], threshold, floor)
        doc_encoder = _DocEncoder(encode, bos_id=bos_id, eos_id=eos_id, vocab_size=vocab_size, dtype=dtype, seed=seed)
        workers = _available_cpus() if num_workers is None else num_workers
        bar = tqdm(desc="tokenising", unit=" docs", disable=not progress, mininterval=0.5)
        with bar:
            for keys, lengths, tokens in _encode_all(_chunks(documents), doc_encoder, workers):
                for key, doc in zip(keys, np.split(tokens, np.cumsum(lengths)[:-1])):
                    splitter.add(key, doc)
                bar.update(len(keys))
                bar.set_postfix(tokens=f"{writers['train'].tokens + writers['val'].tokens:,}", refresh=False)
            splitter.finish()
        for w in writers.values():
            w.close()
        if writers["train"].documents + writers["val"].documents == 0:
            raise ValueError("No documents to tokenise: the input is empty or holds only blank documents.")
        if writers["train"].documents == 0:
            raise ValueError(f"All {writers['val'].documents} documents fell into the held-out split; "
                             f"lower val_fraction or add data.")
        meta = {**settings, "fingerprint": fingerprint, "splits": {s: w.meta() for s, w in writers.items()}}
        atomic_write_json(partial / META, meta)
        if out.exists():
            shutil.rmtree(out)  # only reached for an empty directory or one of our own shard dirs (checked above)
        os.rename(partial, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return load_shards(out)


def _available_cpus() -> int:
    # The CPUs this process may run on (a container or taskset may allow fewer than the machine has).
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_existing(out: Path, fingerprint: str | None, overwrite: bool) -> ShardInfo | None:
    """Return the existing shards if they can be reused; raise if `out` holds something we must not replace."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a directory; choose another output directory for the shards.")
    if not any(out.iterdir()):
        return None
    # Only a directory whose meta.json carries our format marker is ours to replace; never delete anything else.
    try:
        ours = json.loads((out / META).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise FileExistsError(f"{out} already exists and is not a shard directory; choose a new or empty directory.")
    try:
        info = load_shards(out)
    except ValueError:
        info = None  # ours, but damaged
    if info is not None and fingerprint is not None and info.fingerprint == fingerprint:
        info.reused = True
        return info
    if overwrite:
        return None
    what = f"shards of {info.source or 'another input'}" if info else "damaged shards"
    raise FileExistsError(f"{out} already holds {what}; choose another directory or pass overwrite=True.")




# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class SplitInfo:
    documents: int
    tokens: int
    files: tuple[str, ...]
    file_tokens: tuple[int, ...]


@dataclass
class ShardInfo:
    dir: Path
    dtype: str  # numpy dtype name of the token files, little-endian
    vocab_size: int
    eos_id: int
    bos_id: int | None
    source: str
    fingerprint: str
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    version: int = VERSION
    reused: bool = False  # True when build_shards found these shards already built

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ValueError(f"Unknown split {name!r}; the shards in {self.dir} have {', '.join(self.splits)}.")
        return self.splits[name]


def load_shards(shard_dir: str | os.PathLike) -> ShardInfo:
    """Read and check a shard directory's meta.json (every listed file must exist with the right size)."""
    d = Path(shard_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"Shard directory {d} does not exist; build the shards first.")
    meta_path = d / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{d} has no {META}, so it holds no complete shards; rebuild them.")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
        if meta["version"] > VERSION:
            raise ValueError(f"version {meta['version']} is newer than this nanoseek reads ({VERSION})")
        splits = {name: SplitInfo(s["documents"], s["tokens"], tuple(x["file"] for x in s["shards"]),
                                  tuple(x["tokens"] for x in s["shards"])) for name, s in meta["splits"].items()}
        info = ShardInfo(dir=d, dtype=np.dtype(meta["dtype"]).name, vocab_size=meta["vocab_size"],
                         eos_id=meta["eos_id"], bos_id=meta["bos_id"], source=meta["source"],
                         fingerprint=meta["fingerprint"], splits=splits, version=meta["version"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{meta_path} is corrupt ({type(e).__name__}: {e}); delete {d} and rebuild the shards.") from None
    itemsize = np.dtype(info.dtype).itemsize
    for s in info.splits.values():
        for name, n in zip(s.files, s.file_tokens):
            path = d / name
            size = path.stat().st_size if path.is_file() else None
            if size != n * itemsize:
                found = "missing" if size is None else f"{size} bytes"
                raise ValueError(f"Shard {path} should hold {n * itemsize} bytes but is {found}; "
                                 f"delete {d} and rebuild the shards.")
    return info


def check_vocab(info: ShardInfo, model_vocab_size: int) -> None:
    """Fail early, in words, instead of with an index error deep inside the embedding."""
    if info.vocab_size > model_vocab_size:
        raise ValueError(
            f"The shards in {info.dir} use a vocabulary of {info.vocab_size} tokens but the model has only "
            f"{model_vocab_size}; set the model's vocab_size to at least {info.vocab_size} "
            f"(--set vocab_size={info.vocab_size}) or re-tokenise with a smaller tokenizer."
        )


class _TokenStream:
    """One split's shards as a single memory-mapped token stream; reads may span shard boundaries."""

    def __init__(self, info: ShardInfo, split: str):
        s = info.split(split)
        dtype = np.dtype(info.dtype).newbyteorder("<")
        self.maps = [np.memmap(info.dir / f, dtype=dtype, mode="r") for f, n in zip(s.files, s.file_tokens) if n]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])
        self.num_tokens = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while length > 0:
            local = start - int(self.starts[i])
            part = self.maps[i][local : local + length]
            parts.append(part)
            start, length, i = start + len(part), length - len(part), i + 1
        return np.concatenate(parts).astype(np.int64) if len(parts) > 1 else parts[0].astype(np.int64)


def _windows(stream: _TokenStream, seq_len: int) -> int:
    # Window w holds tokens [w * seq_len, w * seq_len + seq_len + 1).
    return max(0, (stream.num_tokens - 1) // seq_len)


def _batch(stream: _TokenStream, windows: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(np.stack([stream.read(int(w) * seq_len, seq_len + 1) for w in windows]))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def _too_small(info: ShardInfo, split: str, tokens: int, need: str) -> ValueError:
    fix = "raise val_fraction when building the shards" if split == "val" else "add data"
    return ValueError(f"The {split} split of {info.dir} has {tokens:,} tokens, too few for {need}; "
                      f"lower batch_size or seq_len, or {fix}.")


class PackedLoader:
    """Endless (inputs, targets) LongTensor [batch_size, seq_len] batches from one split, for one rank.

    Deterministic given the seed: epoch e visits every window once in the order of a permutation drawn from
    numpy's generator seeded with (seed, e). Each global batch is batch_size * world_size consecutive windows of
    that order and rank r takes every world_size-th of them, so ranks never share a window. Windows that do not
    fill a whole global batch are left out of that epoch (a different set each epoch). `epoch` is the epoch
    the next batch comes from; `state_dict()` is the exact position.
    """

    def __init__(self, shard_dir: str | os.PathLike | ShardInfo, split: str = "train", batch_size: int = 8,
                 seq_len: int = 256, *, rank: int = 0, world_size: int = 1, seed: int = 0):
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}.")
        self.info = shard_dir if isinstance(shard_dir, ShardInfo) else load_shards(shard_dir)
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.stream = _TokenStream(self.info, split)
        self.num_windows = _windows(self.stream, seq_len)
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = self.num_windows // self.global_batch
        if self.batches_per_epoch == 0:
            raise _too_small(self.info, split, self.stream.num_tokens,
                             f"one global batch ({self.global_batch} windows of {seq_len + 1} tokens)")
        self.epoch = 0
        self.batch = 0  # index of the next batch within the epoch
        self._order_epoch, self._order = None, None

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.batch * self.global_batch
        windows = self._epoch_order()[start + self.rank : start + self.global_batch : self.world_size]
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return _batch(self.stream, windows, self.seq_len)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order, self._order_epoch = rng.permutation(self.num_windows), self.epoch
        return self._order

    def state_dict(self) -> dict:
        # The global batch (not the per-rank one) is what the position counts, so a run may resume on a
        # different number of ranks as long as batch_size * world_size is unchanged.
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "split": self.split,
                "seq_len": self.seq_len, "global_batch": self.global_batch, "num_windows": self.num_windows,
                "fingerprint": self.info.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        keys = ("seed", "split", "seq_len", "global_batch", "num_windows", "fingerprint")
        diff = [f"{k} {state.get(k)!r} -> {mine[k]!r}" for k in keys if state.get(k) != mine[k]]
        if diff:
            raise ValueError(f"Cannot resume the data loader: the checkpoint's data settings differ ({'; '.join(diff)}); "
                             f"resume with the same shards, seed, seq_len and global batch size.")
        if not 0 <= state["batch"] < self.batches_per_epoch or state["epoch"] < 0:
            raise ValueError(f"Cannot resume the data loader: position epoch={state['epoch']} batch={state['batch']} "
                             f"is out of range.")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def iter_eval_batches(shard_dir: str | os.PathLike | ShardInfo, batch_size: int, seq_len: int, *,
                      split: str = "val", max_batches: int | None = None, rank: int = 0,
                      world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed, finite set of held-out batches: windows in stream order, no shuffling, same on every call.

    Every rank yields the same number of batches (so collective ops line up). A split too small for one
    global batch is served as a single smaller batch rather than not at all.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}.")
    info = shard_dir if isinstance(shard_dir, ShardInfo) else load_shards(shard_dir)
    stream = _TokenStream(info, split)
    num_windows = _windows(stream, seq_len)
    if num_windows // (batch_size * world_size) == 0:
        batch_size = num_windows // world_size
        if batch_size == 0:
            raise _too_small(info, split, stream.num_tokens, f"one window of {seq_len + 1} tokens per rank")
    num_batches = num_windows // (batch_size * world_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    return _eval_batches(stream, num_batches, batch_size, seq_len, rank, world_size)


def _eval_batches(stream, num_batches, batch_size, seq_len, rank, world_size):
    global_batch = batch_size * world_size
    for b in range(num_batches):
        yield _batch(stream, np.arange(b * global_batch + rank, (b + 1) * global_batch, world_size), seq_len)

"""Data inputs, on-disk shards and the packed loader. Fast: a byte-level toy encoder stands in for the tokenizer."""

import json
import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from nanoseek.data import shards as shards_mod
from nanoseek.data import sources
from nanoseek.data.shards import (PackedLoader, TokenizerEncoder, build_shards, check_vocab, iter_eval_batches,
                                  load_shards)
from nanoseek.data.sources import describe_sources, read_documents

BOS, EOS, OFFSET = 1, 2, 3
VOCAB = 256 + OFFSET


def byte_encode(text: str) -> list[int]:
    """Module-level, so picklable: one token per UTF-8 byte, shifted past the special ids."""
    return [b + OFFSET for b in text.encode("utf-8")]


def byte_decode(ids) -> str:
    return bytes(int(i) - OFFSET for i in ids).decode("utf-8")


def exploding_encode(text: str) -> list[int]:
    if "boom" in text:
        raise RuntimeError("encoder crashed")
    return byte_encode(text)


def docs(n: int, prefix: str = "doc") -> list[str]:
    return [f"{prefix} {i}: " + "abcdefghij"[i % 10] * (5 + i % 7) for i in range(n)]


def build(out, documents, **kw):
    kw = {"eos_id": EOS, "bos_id": BOS, "vocab_size": VOCAB, "num_workers": 1, "progress": False, **kw}
    return build_shards(documents, byte_encode if "encode" not in kw else kw.pop("encode"), out, **kw)


def split_stream(info, split) -> np.ndarray:
    s = info.split(split)
    return np.concatenate([np.fromfile(info.dir / f, dtype=info.dtype) for f in s.files]) if s.files else np.array([])


def decoded_docs(info, split) -> list[str]:
    """Cut a split's stream at eos and decode: the inverse of the shard writer."""
    stream = split_stream(info, split).astype(np.int64)
    out, start = [], 0
    for end in np.flatnonzero(stream == EOS):
        piece = stream[start:end]
        assert piece[0] == BOS
        out.append(byte_decode(piece[1:]))
        start = end + 1
    assert start == len(stream)
    return out


# --------------------------------------------------------------------------------------------- sources


def test_text_markdown_jsonl_parquet_and_directories(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first document\n\nstill the first\n")
    (tmp_path / "b.md").write_text("# title\nbody")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"body": "x", "text": "json two"}) + "\n")
    pq.write_table(pa.table({"content": ["pq one", None, "pq two"]}), tmp_path / "d.parquet")
    assert list(read_documents([str(tmp_path / "a.txt")])) == ["first document\n\nstill the first"]
    assert list(read_documents([str(tmp_path / "b.md")])) == ["# title\nbody"]
    assert list(read_documents([str(tmp_path / "c.jsonl")])) == ["json one", "json two"]
    assert list(read_documents([str(tmp_path / "d.parquet")], text_field="content")) == ["pq one", "pq two"]

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / ".git").mkdir()
    (tree / "z.txt").write_text("z")
    (tree / "sub" / "y.jsonl").write_text('{"text": "y"}\n')
    (tree / "a.txt").write_text("   \n")  # blank: skipped
    (tree / "notes.csv").write_text("ignored inside a directory")
    (tree / ".git" / "h.txt").write_text("hidden")
    assert list(read_documents([str(tree)])) == ["y", "z"]  # sorted: sub/ before z.txt


def test_large_text_file_is_split_on_blank_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "LARGE_TEXT_BYTES", 10)
    (tmp_path / "big.txt").write_text("one\nline two\n\n\nthree\n  \nfour")
    assert list(read_documents([str(tmp_path / "big.txt")])) == ["one\nline two", "three", "four"]


def test_builtin_corpus(monkeypatch):
    calls = []

    def fake_corpus(num_docs, seed, tasks=None):
        calls.append((num_docs, seed, tasks))
        return (f"task {seed} {i}" for i in range(num_docs))

    import nanoseek.data.tasks

    monkeypatch.setattr(nanoseek.data.tasks, "builtin_corpus", fake_corpus, raising=False)
    assert list(read_documents(["builtin:3"], seed=7)) == ["task 7 0", "task 7 1", "task 7 2"]
    list(read_documents(["builtin"]))
    assert calls[-1] == (sources.DEFAULT_BUILTIN_DOCS, 0, None)
    list(read_documents(["builtin:4:arithmetic"]))
    assert calls[-1] == (4, 0, ("arithmetic",))
    list(read_documents(["builtin:countdown,arithmetic"]))
    assert calls[-1] == (sources.DEFAULT_BUILTIN_DOCS, 0, ("countdown", "arithmetic"))
    for bad in ("builtin:lots", "builtin:0", "builtin:3:chess", "builtin:3:arithmetic:x"):
        with pytest.raises(ValueError, match="builtin:N:TASK"):
            read_documents([bad])


def test_source_errors_are_one_clear_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        read_documents([str(tmp_path / "nope.txt")])
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"Unknown data format '\.csv'.*\.txt, \.md, \.jsonl, \.parquet"):
        read_documents([str(tmp_path / "data.csv")])
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="No documents found"):
        list(read_documents([str(tmp_path / "empty.txt"), str(tmp_path / "empty.jsonl")]))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2 is not valid JSON"):
        list(read_documents([str(tmp_path / "bad.jsonl")]))
    (tmp_path / "field.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"field\.jsonl line 1 has no 'text' field \(found: body\)"):
        list(read_documents([str(tmp_path / "field.jsonl")]))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="holds no supported data files"):
        read_documents([str(tmp_path / "nothing")])
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        list(read_documents([str(tmp_path / "bin.txt")]))


def test_describe_sources_changes_with_the_data(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "one"}\n')
    first = describe_sources([str(f)])
    assert first == describe_sources([str(f)]) and "a.jsonl" in first
    f.write_text('{"text": "one, then more"}\n')
    assert describe_sources([str(f)]) != first
    assert describe_sources([str(f)], text_field="body") != describe_sources([str(f)])
    assert describe_sources(["builtin:5"], seed=1) != describe_sources(["builtin:5"], seed=2)


# --------------------------------------------------------------------------------------------- shards


def test_round_trip_and_meta(tmp_path):
    corpus = docs(300)
    info = build(tmp_path / "s", corpus, shard_tokens=500, val_fraction=0.1)
    assert info.dtype == "uint16" and not info.reused
    train, val = decoded_docs(info, "train"), decoded_docs(info, "val")
    assert sorted(train + val) == sorted(corpus)
    assert 10 <= len(val) <= 60  # about 10% by hash
    s = info.split("train")
    assert len(s.files) > 1 and all(n == 500 for n in s.file_tokens[:-1]) and sum(s.file_tokens) == s.tokens
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] == len(train) and meta["eos_id"] == EOS and meta["bos_id"] == BOS
    assert meta["vocab_size"] == VOCAB and meta["dtype"] == "uint16" and meta["version"] == 1


def test_without_bos_and_wide_vocab(tmp_path):
    info = build(tmp_path / "s", ["hello", "world"], bos_id=None, vocab_size=70_000, val_fraction=0.0)
    assert info.dtype == "uint32"
    # Without a held-out split the stream keeps the input order exactly.
    assert split_stream(info, "train").tolist() == byte_encode("hello") + [EOS] + byte_encode("world") + [EOS]
    with pytest.raises(ValueError, match="No documents to tokenise"):
        build(tmp_path / "u", ["", "  \n"])
    assert not (tmp_path / "u").exists()
    with pytest.raises(ValueError, match="token id .* outside vocab_size=100"):
        build(tmp_path / "t", ["hello"], vocab_size=100, bos_id=None, eos_id=2)


def test_train_and_val_never_share_a_document(tmp_path):
    corpus = docs(200) * 3  # every text three times
    info = build(tmp_path / "s", corpus, val_fraction=0.2)
    train, val = decoded_docs(info, "train"), decoded_docs(info, "val")
    assert not set(train) & set(val) and len(train) + len(val) == 600
    assert all(c == 3 for c in Counter(val).values())


def test_small_corpus_still_gets_a_val_split_and_exact_val_docs(tmp_path):
    info = build(tmp_path / "a", docs(5), val_fraction=0.01)
    assert info.split("val").documents == 1 and info.split("train").documents == 4
    info = build(tmp_path / "b", docs(50) + docs(50), val_docs=7)
    assert len(set(decoded_docs(info, "val"))) == 7 and info.split("val").documents == 14
    info = build(tmp_path / "c", ["only one"], val_fraction=0.5, seed=3)  # never leaves train empty
    assert info.split("train").documents + info.split("val").documents == 1


def test_parallel_build_equals_serial_build(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_mod, "CHUNK_DOCS", 16)  # many chunks, so ordering across workers matters
    corpus = docs(400)
    one = build(tmp_path / "one", corpus, num_workers=1, shard_tokens=1000)
    two = build(tmp_path / "two", corpus, num_workers=2, shard_tokens=1000)
    for split in ("train", "val"):
        assert np.array_equal(split_stream(one, split), split_stream(two, split))
    assert one.splits == two.splits


def test_reuse_overwrite_and_refusals(tmp_path):
    out = tmp_path / "s"
    first = build(out, docs(50), source="corpus A")

    def untouchable():
        raise AssertionError("reused shards must not read the documents")
        yield

    again = build(out, untouchable(), source="corpus A")
    assert again.reused and again.fingerprint == first.fingerprint
    with pytest.raises(FileExistsError, match="already holds shards of corpus A.*overwrite=True"):
        build(out, docs(60), source="corpus B")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build(out, docs(50))  # no source: nothing to key reuse on
    other = build(out, docs(60), source="corpus B", overwrite=True)
    assert not other.reused and other.split("train").documents + other.split("val").documents == 60
    assert build(out, docs(60), source="corpus B", shard_tokens=123, overwrite=True).fingerprint != other.fingerprint
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a shard directory"):
        build(mine, docs(10), overwrite=True)
    (mine / "meta.json").write_text('{"someone": "else"}')
    with pytest.raises(FileExistsError, match="not a shard directory"):
        build(mine, docs(10), overwrite=True)
    assert (mine / "thesis.txt").read_text() == "precious"
    # Our own directory, damaged: replaced only when asked.
    (out / "meta.json").write_text('{"format": "nanoseek-shards"}')
    with pytest.raises(FileExistsError, match="already holds damaged shards"):
        build(out, docs(60), source="corpus B")
    assert build(out, docs(60), source="corpus B", overwrite=True).split("train").documents > 0


def test_a_crash_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "s"
    (tmp_path / ".s.partial").mkdir()  # left over by an earlier killed build
    (tmp_path / ".s.partial" / "train_000000.bin").write_bytes(b"\0\0")
    corpus = docs(300) + ["boom"]
    with pytest.raises(RuntimeError, match="encoder crashed"):
        build(out, corpus, encode=exploding_encode, shard_tokens=100)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    build(out, docs(100), shard_tokens=100)
    names = sorted(p.name for p in tmp_path.rglob("*"))
    assert "meta.json" in names and not [n for n in names if "tmp" in n or "partial" in n]
    # A build crashing while replacing existing shards leaves the old ones intact.
    with pytest.raises(RuntimeError):
        build(out, corpus, encode=exploding_encode, overwrite=True)
    assert load_shards(out).split("train").documents + load_shards(out).split("val").documents == 100


def test_load_shards_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_shards(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        load_shards(tmp_path / "empty")
    info = build(tmp_path / "s", docs(100), shard_tokens=200)
    first = info.dir / info.split("train").files[0]
    first.write_bytes(first.read_bytes()[:-2])
    with pytest.raises(ValueError, match="train_000000.bin should hold 400 bytes but is 398 bytes"):
        load_shards(info.dir)
    (info.dir / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is corrupt"):
        load_shards(info.dir)


def test_check_vocab(tmp_path):
    info = build(tmp_path / "s", docs(10))
    check_vocab(info, VOCAB)
    with pytest.raises(ValueError, match=rf"vocabulary of {VOCAB} tokens but the model has only 200; .*vocab_size={VOCAB}"):
        check_vocab(info, 200)


def test_tokenizer_encoder_pickles_and_works_in_workers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(docs(50), trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<bos>", "<eos>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    enc = TokenizerEncoder(tmp_path)
    clone = pickle.loads(pickle.dumps(enc))
    assert clone("doc 3: ddd") == enc("doc 3: ddd") == tok.encode("doc 3: ddd").ids
    assert enc.fingerprint.startswith("tokenizer.json sha256=")
    info = build_shards(docs(100), enc, tmp_path / "s", eos_id=enc.token_id("<eos>"), bos_id=enc.token_id("<bos>"),
                        vocab_size=enc.vocab_size, num_workers=2, progress=False)
    assert info.split("train").tokens > 0
    with pytest.raises(FileNotFoundError, match="No tokenizer at"):
        TokenizerEncoder(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    # Distinct documents, so every window's content identifies it.
    out = tmp_path_factory.mktemp("loader") / "s"
    build(out, docs(400, "loader"), shard_tokens=997, val_fraction=0.05)
    return out


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_are_shifted_windows_of_the_stream(shard_dir):
    info = load_shards(shard_dir)
    stream = split_stream(info, "train").astype(np.int64)
    loader = PackedLoader(shard_dir, "train", batch_size=4, seq_len=16, seed=1)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):
        starts = [s for s in range(0, len(stream) - 16, 16) if np.array_equal(stream[s : s + 16], row_x.numpy())]
        assert starts and np.array_equal(stream[starts[0] + 1 : starts[0] + 17], row_y.numpy())


def test_loader_is_deterministic_and_epochs_cover_every_window(shard_dir):
    a = take(PackedLoader(shard_dir, "train", 4, 16, seed=5), 6)
    b = take(PackedLoader(shard_dir, "train", 4, 16, seed=5), 6)
    c = take(PackedLoader(shard_dir, "train", 4, 16, seed=6), 6)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))

    loader = PackedLoader(shard_dir, "train", 8, 64, seed=0)
    n = loader.batches_per_epoch
    epoch0 = {tuple(r) for x, _ in take(loader, n) for r in x.tolist()}
    assert len(epoch0) == n * 8 and loader.epoch == 1 and loader.batch == 0
    epoch1 = take(loader, n)
    assert {tuple(r) for x, _ in epoch1 for r in x.tolist()} <= {tuple(r) for r in _all_windows(shard_dir, 64)}
    assert loader.epoch == 2


def _all_windows(shard_dir, seq_len):
    stream = split_stream(load_shards(shard_dir), "train").astype(np.int64)
    return [stream[s : s + seq_len] for s in range(0, len(stream) - seq_len, seq_len)]


@pytest.mark.parametrize("k", [3, 0, 17])
def test_resume_mid_epoch_equals_uninterrupted(shard_dir, k):
    straight = PackedLoader(shard_dir, "train", 4, 32, seed=3)
    n = straight.batches_per_epoch
    expected = take(straight, k + n)  # runs past the end of an epoch
    first = PackedLoader(shard_dir, "train", 4, 32, seed=3)
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON (checkpoint) round trip
    resumed = PackedLoader(shard_dir, "train", 4, 32, seed=3)
    resumed.load_state_dict(state)
    assert resumed.epoch == first.epoch
    for (x, y), (ex, ey) in zip(take(resumed, n), expected[k:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_resume_refuses_other_settings_but_allows_other_world_sizes(shard_dir):
    state = PackedLoader(shard_dir, "train", 4, 32, seed=3).state_dict()
    with pytest.raises(ValueError, match="seq_len 32 -> 16"):
        PackedLoader(shard_dir, "train", 4, 16, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="seed 3 -> 4"):
        PackedLoader(shard_dir, "train", 4, 32, seed=4).load_state_dict(state)
    PackedLoader(shard_dir, "train", 2, 32, rank=1, world_size=2, seed=3).load_state_dict(state)


def test_ranks_split_each_global_batch(shard_dir):
    single = take(PackedLoader(shard_dir, "train", 6, 16, seed=2), 5)
    ranks = [take(PackedLoader(shard_dir, "train", 2, 16, rank=r, world_size=3, seed=2), 5) for r in range(3)]
    for step, (gx, _) in enumerate(single):
        parts = [Counter(map(tuple, ranks[r][step][0].tolist())) for r in range(3)]
        assert all(not (parts[i].keys() & parts[j].keys()) for i in range(3) for j in range(i + 1, 3))
        assert parts[0] + parts[1] + parts[2] == Counter(map(tuple, gx.tolist()))


def test_too_small_corpus_is_a_clear_error(shard_dir):
    with pytest.raises(ValueError, match=r"train split of .* too few for one global batch \(64 windows of 1025 tokens\)"):
        PackedLoader(shard_dir, "train", 32, 1024, world_size=2)
    with pytest.raises(ValueError, match="rank must be in"):
        PackedLoader(shard_dir, "train", 2, 16, rank=2, world_size=2)


def test_eval_batches_are_fixed_finite_and_in_order(shard_dir):
    info = load_shards(shard_dir)
    stream = split_stream(info, "val").astype(np.int64)
    batches = list(iter_eval_batches(shard_dir, 2, 16, max_batches=3))
    again = list(iter_eval_batches(shard_dir, 2, 16, max_batches=3))
    assert len(batches) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert np.array_equal(batches[0][0][1].numpy(), stream[16:32])  # window 1, no shuffling
    everything = list(iter_eval_batches(shard_dir, 2, 16))
    assert len(everything) == (len(stream) - 1) // 16 // 2
    r0 = list(iter_eval_batches(shard_dir, 1, 16, rank=0, world_size=2))
    r1 = list(iter_eval_batches(shard_dir, 1, 16, rank=1, world_size=2))
    assert len(r0) == len(r1) and torch.equal(torch.cat([r0[0][0], r1[0][0]]), everything[0][0])
    # Too small for a full batch: one smaller batch; too small for one window: an error.
    small = list(iter_eval_batches(shard_dir, 10_000, 16))
    assert len(small) == 1 and small[0][0].shape == ((len(stream) - 1) // 16, 16)
    with pytest.raises(ValueError, match="val split .* raise val_fraction"):
        list(iter_eval_batches(shard_dir, 1, len(stream)))

"""Tokenizer: fixed special ids, digit splitting, round trips, chat template and loss mask, and parity with
transformers.AutoTokenizer on the saved directory."""

import json

import pytest

from nanoseek.data.tasks import builtin_corpus
from nanoseek.tokenizer import CHAT_TEMPLATE, MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer

SAMPLES = [
    "hello world",
    "Compute 347 + 582.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "unicode: é, 漢字, emoji 🙂",
    "<think>\n7+2+0=9\n</think><answer>929</answer>",
    "12345678901234567890",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Compute 12 + 30."},
    {"role": "assistant", "content": "<think>\n2+0+0=2\n</think><answer>42</answer>"},
    {"role": "user", "content": "And 7 * 6?"},
]


@pytest.fixture(scope="module")
def tok():
    texts = list(builtin_corpus(300, seed=0)) + ["The quick brown fox jumps over the lazy dog. " * 20] * 10
    return Tokenizer.train(texts, vocab_size=600)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return d


def test_special_tokens_have_fixed_ids_and_are_single_tokens(tok):
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i
        assert tok.encode(t) == [i]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert (tok.think_id, tok.end_think_id, tok.answer_id, tok.end_answer_id) == (6, 7, 8, 9)
    assert tok.encode("x<think>y</think>")[-3:] == [6, tok.encode("y")[0], 7]


def test_special_strings_match_the_task_layer():
    from nanoseek.data.tasks import base

    assert [base.THINK, base.END_THINK, base.ANSWER, base.END_ANSWER] == SPECIAL_TOKENS[6:10]
    assert base.ASSISTANT == SPECIAL_TOKENS[5]


def test_digits_are_one_token_each(tok):
    for number in ["0", "7", "347", "1000000", "98765432109876543210"]:
        ids = tok.encode(number)
        assert len(ids) == len(number)
        assert [tok.decode([i]) for i in ids] == list(number)
    ids = tok.encode("x 3456 y")
    assert [tok.decode([i]) for i in ids if tok.decode([i]).isdigit()] == list("3456")


def test_round_trip(tok):
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
        assert tok.decode(tok.encode(s, add_bos=True), skip_special=True) == s
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_id
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]


def test_skip_special_keeps_reasoning_tags(tok):
    ids = [tok.bos_id, tok.assistant_id] + tok.encode("<think>a</think><answer>1</answer>") + [tok.eos_id]
    assert tok.decode(ids, skip_special=True) == "<think>a</think><answer>1</answer>"


def test_vocab_size_real_and_bounded(tok):
    assert MIN_VOCAB_SIZE < tok.vocab_size <= 600
    assert max(max(tok.encode(s) or [0]) for s in SAMPLES) < tok.vocab_size


def test_vocab_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match=r"vocab size 100 .* at least 266"):
        Tokenizer.train(["abc"], vocab_size=100)


def test_chat_template_and_loss_mask(tok):
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text == ("<|bos|><|system|>You are terse.<|user|>Compute 12 + 30.<|assistant|>"
                    "<think>\n2+0+0=2\n</think><answer>42</answer><|eos|><|user|>And 7 * 6?<|assistant|>")
    assert tok.apply_chat_template(MESSAGES[1:2]) == "<|bos|><|user|>Compute 12 + 30.<|assistant|>"
    ids, mask = tok.encode_chat(MESSAGES[:3])
    assert ids == tok.encode(tok.apply_chat_template(MESSAGES[:3], add_generation_prompt=False))
    assert len(mask) == len(ids)
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == tok.encode(MESSAGES[2]["content"]) + [tok.eos_id]
    # the mask is one contiguous run ending at the eos, starting right after <|assistant|>
    start = mask.index(1)
    assert ids[start - 1] == tok.assistant_id and ids[-1] == tok.eos_id and all(mask[start:])
    assert tok.render_chat_ids(MESSAGES[1:2]) == tok.encode(tok.apply_chat_template(MESSAGES[1:2]))
    with pytest.raises(ValueError, match="unknown chat role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_save_load(tok, saved):
    names = {p.name for p in saved.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    cfg = json.loads((saved / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["chat_template"] == CHAT_TEMPLATE
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<|bos|>", "<|eos|>", "<|pad|>")
    again = Tokenizer.load(saved)
    assert again.vocab_size == tok.vocab_size
    for s in SAMPLES:
        assert again.encode(s) == tok.encode(s)


def test_load_missing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        Tokenizer.load(tmp_path)


def test_transformers_parity(tok, saved):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(saved))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    for s in SAMPLES + list(builtin_corpus(20, seed=1)):
        assert hf.encode(s, add_special_tokens=False) == tok.encode(s)
        assert hf(s)["input_ids"] == tok.encode(s, add_bos=True)
        assert hf.decode(tok.encode(s)) == tok.decode(tok.encode(s))
    for msgs in (MESSAGES, MESSAGES[1:2], MESSAGES[:3]):
        for gen in (True, False):
            ours = tok.apply_chat_template(msgs, add_generation_prompt=gen)
            assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == ours
            hf_ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
            hf_ids = hf_ids["input_ids"] if not isinstance(hf_ids, list) else hf_ids
            assert hf_ids == tok.encode_chat(msgs, add_generation_prompt=gen)[0]


def test_cli_train(tmp_path, capsys):
    from nanoseek.cli import main

    data = tmp_path / "a.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in builtin_corpus(50, seed=3)) + "\n")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(data), "builtin:20", "--vocab-size", "400",
                 "--out", str(out)]) == 0
    assert Tokenizer.load(out).encode("<think>") == [6]
    assert main(["tokenizer", "train", "--data", "builtin:5", "--vocab-size", "400", "--out", str(out)]) == 2
    assert "already holds a tokenizer" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--data", "builtin:5", "--vocab-size", "10",
                 "--out", str(tmp_path / "x")]) == 2
    assert "vocab size 10" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

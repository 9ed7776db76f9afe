"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), nanoseek's special tokens and its chat format.

Why these choices:
- Byte-level BPE never meets an unknown character, so any text (and any model output) round-trips exactly.
- Digits are split one per token before BPE sees them: a tiny model learns column arithmetic far more easily when
  "347" is always 3, 4, 7 rather than whatever chunks the corpus happened to favour.
- Special tokens sit at fixed ids at the start of the vocabulary, so the model config's bos_token_id=0 and
  eos_token_id=1 hold for every tokenizer nanoseek trains:

      0 <|bos|>  1 <|eos|>  2 <|pad|>  3 <|system|>  4 <|user|>  5 <|assistant|>
      6 <think>  7 </think>  8 <answer>  9 </answer>

  The first six are "special" (dropped by `decode(skip_special=True)`); the four reasoning tags are ordinary
  added tokens, so decoding a completion without specials still shows the tags a verifier looks for.

The chat format (R1-like, no newlines added, nothing pre-filled in the assistant turn):

    <|bos|>[<|system|>SYSTEM]<|user|>USER<|assistant|>ASSISTANT<|eos|><|user|>...<|assistant|>

`save()` writes tokenizer.json, tokenizer_config.json (with the same format as a Jinja `chat_template`) and
special_tokens_map.json, so `transformers.AutoTokenizer.from_pretrained(dir)` loads it and renders the same
prompt. We render the template in plain Python here, so jinja2 is not a runtime dependency.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from nanoseek.atomic import atomic_write_text

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
# Order is the id: never reorder, only append.
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, THINK, END_THINK, ANSWER, END_ANSWER]
# Tokens that are markup of the conversation itself, not of the model's reasoning.
CONTROL_TOKENS = {BOS, EOS, PAD, SYSTEM, USER, ASSISTANT}
N_BYTES = 256  # the byte-level alphabet every BPE vocabulary starts from
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + N_BYTES
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# The Jinja equivalent of `Tokenizer.apply_chat_template`; tests check that transformers renders it identically.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _check_messages(messages: Sequence[dict]) -> None:
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"each chat message needs 'role' and 'content', got {m!r}")
        if m["role"] not in ROLE_TOKENS:
            raise ValueError(f"unknown chat role {m['role']!r}: use one of system, user, assistant")
        if not isinstance(m["content"], str):
            raise ValueError(f"chat message content must be a string, got {type(m['content']).__name__}")


_SPECIALS_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def _without_specials(texts: Iterable[str]) -> Iterator[str]:
    """Feed BPE the text between special tokens as separate pieces: the specials become single tokens anyway, so
    merges spent on "<|" or "think>" would be wasted, and no merge should span a special token."""
    for text in texts:
        yield from (piece for piece in _SPECIALS_RE.split(text) if piece)


class Tokenizer:
    """A trained byte-level BPE with nanoseek's special tokens. Build with `train` or `load`."""

    def __init__(self, backend, model_max_length: int = 1024):
        # `backend` is a `tokenizers.Tokenizer`; kept private so the rest of nanoseek depends only on this class.
        self._tok = backend
        self.model_max_length = model_max_length
        ids = {}
        for token in SPECIAL_TOKENS:
            i = backend.token_to_id(token)
            if i is None:
                raise ValueError(f"tokenizer has no {token} token: it was not trained by nanoseek; "
                                 f"train one with `nanoseek tokenizer train`")
            ids[token] = i
        self._ids = ids

    # ------------------------------------------------------------------------------------------ training
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, split_digits: bool = True, min_frequency: int = 2,
              model_max_length: int = 1024, show_progress: bool = False) -> "Tokenizer":
        """Train on any iterable of strings. The result may have fewer than `vocab_size` tokens on a small corpus
        (BPE stops when no pair occurs `min_frequency` times); read `.vocab_size` for the real size."""
        from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as Backend

        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab size {vocab_size} is too small: it must be at least {MIN_VOCAB_SIZE} "
                             f"({len(SPECIAL_TOKENS)} special tokens + {N_BYTES} bytes)")
        backend = Backend(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if split_digits:  # split digits first so no BPE merge can ever span two digits
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            show_progress=show_progress,
            # the trainer puts these first, in order: that is what fixes their ids
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        backend.train_from_iterator(_without_specials(texts), trainer=trainer)
        return cls(cls._finish(backend), model_max_length=model_max_length)

    @staticmethod
    def _finish(backend):
        """Mark the reasoning tags non-special and add the BOS post-processor; done on the JSON form because the
        trainer can only add special tokens, and a round trip through JSON is the library's stable interface."""
        from tokenizers import Tokenizer as Backend

        spec = json.loads(backend.to_str())
        for entry in spec["added_tokens"]:
            entry["special"] = entry["content"] in CONTROL_TOKENS
        bos_id = backend.token_to_id(BOS)
        # `encode(text, add_bos=True)` and transformers' default `tokenizer(text)` both prepend BOS through this.
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}},
        }
        return Backend.from_str(json.dumps(spec))

    # ------------------------------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    bos_id = property(lambda self: self._ids[BOS])
    eos_id = property(lambda self: self._ids[EOS])
    pad_id = property(lambda self: self._ids[PAD])
    system_id = property(lambda self: self._ids[SYSTEM])
    user_id = property(lambda self: self._ids[USER])
    assistant_id = property(lambda self: self._ids[ASSISTANT])
    think_id = property(lambda self: self._ids[THINK])
    end_think_id = property(lambda self: self._ids[END_THINK])
    answer_id = property(lambda self: self._ids[ANSWER])
    end_answer_id = property(lambda self: self._ids[END_ANSWER])

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    # ------------------------------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # Special-token strings inside `text` become their single tokens: that is how "<think>" in a worked
        # solution becomes id 6. (User text that spells "<|assistant|>" gets the token too; see encode_chat.)
        return self._tok.encode(text, add_special_tokens=add_bos).ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """Tokenise many texts in parallel (the library uses all cores): what shard building wants."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_bos)]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    # ------------------------------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render messages exactly as CHAT_TEMPLATE does under Jinja (tested against transformers)."""
        return "".join(text for text, _ in self._chat_segments(messages, add_generation_prompt))

    def _chat_segments(self, messages: Sequence[dict], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """The rendered chat as (text, trained_on) pieces; every boundary falls on a special token, so encoding the
        pieces one by one gives the same ids as encoding the whole string."""
        _check_messages(messages)
        segs: list[tuple[str, bool]] = [(BOS, False)]
        for m in messages:
            segs.append((ROLE_TOKENS[m["role"]], False))
            if m["role"] == "assistant":
                segs += [(m["content"], True), (EOS, True)]  # learning to stop is part of the answer
            else:
                segs.append((m["content"], False))
        if add_generation_prompt:
            segs.append((ASSISTANT, False))
        return [(t, train) for t, train in segs if t]

    def render_chat_ids(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat: the prompt an RL rollout or `generate` starts from."""
        return self.encode_chat(messages, add_generation_prompt)[0]

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) for SFT: the mask is 1 exactly on assistant content tokens and the EOS closing each
        assistant turn, 0 on BOS, role markers, system and user text."""
        ids: list[int] = []
        mask: list[int] = []
        for text, trained in self._chat_segments(messages, add_generation_prompt):
            piece = self.encode(text)
            ids += piece
            mask += [int(trained)] * len(piece)
        return ids, mask

    # ------------------------------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json, each atomically."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_map,
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": False,  # byte-level BPE round-trips exactly; don't "clean" spaces
            "chat_template": CHAT_TEMPLATE,
        }
        atomic_write_text(d / "tokenizer.json", self._tok.to_str(pretty=True))
        atomic_write_text(d / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        atomic_write_text(d / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {d}: train one with "
                                    f"`nanoseek tokenizer train --data ... --out {d}`")
        model_max_length = 1024
        cfg = d / "tokenizer_config.json"
        if cfg.is_file():
            model_max_length = int(json.loads(cfg.read_text()).get("model_max_length", model_max_length))
        return cls(Backend.from_file(str(path)), model_max_length=model_max_length)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length})"

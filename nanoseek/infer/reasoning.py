"""Where a model's thinking is: counting thinking tokens and splitting output text into reasoning and answer.

DeepSeek-R1-style output is `<think>reasoning</think>` then the answer, here optionally inside
`<answer>...</answer>`; a chat template may open `<think>` in the prompt, so the output starts inside it.
"""

from __future__ import annotations

from nanoseek.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK


def count_thinking_tokens(ids: list[int], think_id: int, end_think_id: int, think_open: bool = False) -> int:
    """Tokens generated inside <think>...</think> (the region may have been opened by the prompt)."""
    inside, n = think_open, 0
    for t in ids:
        if t == think_id:
            inside = True
        elif t == end_think_id:
            inside = False
        elif inside:
            n += 1
    return n


def split_reasoning(text: str, think_open: bool = False) -> tuple[str, str]:
    """(reasoning, answer). Reasoning is inside <think>...</think>; with no opening tag in the text (the prompt
    opened it), everything before the first </think> is reasoning. The answer is inside <answer>...</answer> if
    present, else the text after </think>; with no tags at all the whole text is the answer, unless the prompt
    left a think region open, in which case the whole text is (unfinished) reasoning."""
    reasoning, rest = "", text
    if THINK in text:
        before, _, after = text.partition(THINK)
        reasoning, closed, tail = after.partition(END_THINK)
        rest = before + tail if closed else before
    elif END_THINK in text:
        reasoning, _, rest = text.partition(END_THINK)
    elif think_open:
        reasoning, rest = text, ""
    if ANSWER in rest:
        rest = rest.partition(ANSWER)[2].partition(END_ANSWER)[0]
    return reasoning.strip(), rest.strip()


def think_left_open(ids: list[int], open_id: int, close_id: int) -> bool:
    """True if the last think tag in `ids` opens a region (a template that pre-fills <think>)."""
    for t in reversed(ids):
        if t == close_id:
            return False
        if t == open_id:
            return True
    return False

"""The synthetic key-value recall task of the tiny demo model (``models/kv-recall``).

A prompt states 3-5 facts "NAME has VALUE ." with distinct names and distinct values drawn from
small word lists, then asks about one of the names; the answer is that name's value::

    alice has red . bob has blue . carol has green . what does bob have ?   ->   blue

The tokenizer is word-level and prepends ``<bos>``, so the token at word index ``i`` of the
prompt text sits at token position ``i + 1``.  :func:`make_prompts` is deterministic in
``(n, seed)`` and is shared by ``tools/train_tiny.py`` (training and held-out evaluation) and by
evaluation code that checks where attribution lands.

>>> example = make_prompts(1, seed=0)[0]
>>> prompt, answer, positions = example
>>> words = ["<bos>"] + prompt.split()
>>> words[positions["value"]] == answer and words[positions["key"]] == words[positions["query"]]
True
"""
from __future__ import annotations

import random
from typing import NamedTuple

__all__ = [
    "NAMES", "VALUES", "SPECIALS", "TEMPLATE_WORDS", "MIN_FACTS", "MAX_FACTS",
    "Example", "make_prompts", "vocabulary", "group", "HELD_OUT_SEED", "TITLE", "DESCRIPTION", "WARMUP_NOTE",
]

NAMES = (
    "alice", "bob", "carol", "dave", "erin", "frank",
    "grace", "heidi", "ivan", "judy", "mallory", "oscar",
)
VALUES = (
    "red", "blue", "green", "yellow", "black", "white",
    "pink", "brown", "orange", "purple", "grey", "gold",
)
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
TEMPLATE_WORDS = ("has", ".", "what", "does", "have", "?")
MIN_FACTS, MAX_FACTS = 3, 5
HELD_OUT_SEED = 1234  # the seed of the held-out evaluation prompts (training uses other seeds)

# What tools/train_tiny.py's TRAINING.md says of the task.
TITLE = "key-value recall"
DESCRIPTION = (f"Prompts of {MIN_FACTS}-{MAX_FACTS} facts `NAME has VALUE .` (distinct names from {len(NAMES)}, "
               f"distinct values\nfrom {len(VALUES)}), then a question about one name; the model must predict that "
               "name's value at the `?`:")
WARMUP_NOTE = ("This forms\n   the previous-token and induction heads that recall needs; trained on the task alone, "
               "the model stays\n   for thousands of steps at picking any value of the prompt (about 1 in 4).")


class Example(NamedTuple):
    """One prompt: unpacks as ``(prompt, answer, positions)``.

    ``positions`` holds token positions (``<bos>`` is position 0) of the decisive tokens:
    ``"value"`` the value token of the fact that answers the question (the answer's earlier
    occurrence), ``"key"`` the name of that fact, ``"query"`` the name in the question, and
    ``"values"`` / ``"keys"`` all value / name positions of the facts, in order.
    """

    prompt: str
    answer: str
    positions: dict


def vocabulary() -> list[str]:
    """All words of the task, special tokens first (their ids are 0..3)."""
    return list(SPECIALS) + list(TEMPLATE_WORDS) + list(NAMES) + list(VALUES)


def _example(rng: random.Random) -> Example:
    count = rng.randint(MIN_FACTS, MAX_FACTS)
    names = rng.sample(NAMES, count)
    values = rng.sample(VALUES, count)
    asked = rng.randrange(count)
    words: list[str] = []
    keys, value_positions = [], []
    for name, value in zip(names, values):
        keys.append(len(words) + 1)               # +1: <bos> comes first
        value_positions.append(len(words) + 3)
        words += [name, "has", value, "."]
    words += ["what", "does", names[asked], "have", "?"]
    positions = {
        "value": value_positions[asked],
        "key": keys[asked],
        "query": len(words) - 2,                  # the name in the question (<bos> offset included)
        "values": value_positions,
        "keys": keys,
    }
    return Example(" ".join(words), values[asked], positions)


def make_prompts(n: int, seed: int | str) -> list[Example]:
    """``n`` examples drawn deterministically from ``seed`` (same arguments, same list; str seeds too)."""
    rng = random.Random(seed)
    return [_example(rng) for _ in range(n)]


def group(example: Example) -> str:
    """The accuracy breakdown of training reports: the number of facts.

    >>> group(make_prompts(1, seed=0)[0])
    '4 facts'
    """
    return f"{len(example.positions['values'])} facts"


if __name__ == "__main__":
    for prompt, answer, positions in make_prompts(3, HELD_OUT_SEED):
        print(f"{prompt}  ->  {answer}   {positions}")

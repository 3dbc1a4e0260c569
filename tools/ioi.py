"""Indirect-object identification (IOI, Wang et al. 2022) with a word-level vocabulary.

Two distinct names meet at a place; then one of them (the subject, named twice) gives an object to
the other (the indirect object, named once); the answer is the indirect object::

    when alice and bob went to the park , bob gave a ball to   ->   alice

The first clause names the indirect object first (ABBA) or second (BABA).  Same interface as
``tools/tasks.py``: :func:`make_prompts` is deterministic in ``(n, seed)``; positions count ``<bos>``
as position 0.

>>> prompt, answer, positions = make_prompts(1, seed=0)[0]
>>> words = ["<bos>"] + prompt.split()
>>> words[positions["io"]] == answer and words[positions["s1"]] == words[positions["s2"]] != answer
True
"""
from __future__ import annotations

import random

from tasks import NAMES, SPECIALS, Example

__all__ = ["TITLE", "DESCRIPTION", "WARMUP_NOTE", "TEMPLATES", "PLACES", "OBJECTS", "make_prompts", "vocabulary",
           "group", "HELD_OUT_SEED"]

TITLE = "indirect-object identification"
TEMPLATES = (
    "when {first} and {second} went to the {place} , {subject} gave a {thing} to",
    "after {first} and {second} met at the {place} , {subject} handed a {thing} to",
    "while {first} and {second} were at the {place} , {subject} brought a {thing} to",
    "then {first} and {second} had a long day at the {place} . {subject} sent a {thing} to",
)
PLACES = ("store", "park", "school", "office", "beach", "market")
OBJECTS = ("drink", "ball", "book", "letter", "gift", "key")
HELD_OUT_SEED = 1234  # the seed of the held-out evaluation prompts (training uses other seeds)
WARMUP_NOTE = "It forms the previous-token and induction heads that copying a name from the context builds on."
DESCRIPTION = (f"Prompts from {len(TEMPLATES)} templates such as `{TEMPLATES[0]}` with two distinct names from "
               f"{len(NAMES)}, a place from {len(PLACES)} and an object from {len(OBJECTS)}; the subject is named "
               "twice, the indirect object once, first (ABBA) or second (BABA); the model must predict the indirect "
               "object:")


def vocabulary() -> list[str]:
    """All words of the task, special tokens first (their ids are 0..3)."""
    template_words = dict.fromkeys(w for t in TEMPLATES for w in t.split() if not w.startswith("{"))
    return list(SPECIALS) + list(template_words) + list(NAMES) + list(PLACES) + list(OBJECTS)


def _example(rng: random.Random) -> Example:
    template = rng.choice(TEMPLATES)
    indirect, subject = rng.sample(NAMES, 2)
    order = rng.choice(("ABBA", "BABA"))
    first, second = (indirect, subject) if order == "ABBA" else (subject, indirect)
    words = template.format(first=first, second=second, subject=subject,
                            place=rng.choice(PLACES), thing=rng.choice(OBJECTS)).split()
    named = [i + 1 for i, w in enumerate(words) if w in (indirect, subject)]   # +1: <bos> comes first
    io = next(p for p in named if words[p - 1] == indirect)
    s1, s2 = (p for p in named if words[p - 1] == subject)
    return Example(" ".join(words), indirect, {"io": io, "s1": s1, "s2": s2, "order": order})


def make_prompts(n: int, seed: int | str) -> list[Example]:
    """``n`` examples drawn deterministically from ``seed`` (same arguments, same list; str seeds too)."""
    rng = random.Random(seed)
    return [_example(rng) for _ in range(n)]


def group(example: Example) -> str:
    """The accuracy breakdown of training reports: the order of the names."""
    return example.positions["order"]


if __name__ == "__main__":
    for prompt, answer, positions in make_prompts(3, HELD_OUT_SEED):
        print(f"{prompt}  ->  {answer}   {positions}")

"""Induction: a sequence of distinct words, then a copy of a short chunk of it; the answer is the word
that followed the chunk the first time::

    cat sun box pen oak map fox jar bed cup sun box   ->   pen

The chunk (1-3 words) starts anywhere in the sequence (8-14 words), so its distance to its first
occurrence varies and only matching content finds the answer.  Same interface as ``tools/tasks.py``:
:func:`make_prompts` is deterministic in ``(n, seed)``; positions count ``<bos>`` as position 0.

>>> prompt, answer, positions = make_prompts(1, seed=0)[0]
>>> words = ["<bos>"] + prompt.split()
>>> words[positions["next"]] == answer and words[positions["next"] - 1] == words[-1]
True
"""
from __future__ import annotations

import random

from tasks import SPECIALS, Example

__all__ = ["TITLE", "DESCRIPTION", "WARMUP_NOTE", "WORDS", "MIN_LENGTH", "MAX_LENGTH", "MAX_CHUNK", "make_prompts",
           "vocabulary", "group", "HELD_OUT_SEED"]

TITLE = "induction"
WORDS = (
    "cat", "dog", "sun", "car", "tree", "box", "cup", "hat", "pen", "map", "key", "bag", "bed", "bus", "cow", "egg",
    "fan", "fox", "gem", "ink", "jar", "kit", "leg", "log", "mug", "net", "oak", "pig", "rat", "rug", "saw", "toy",
)
MIN_LENGTH, MAX_LENGTH, MAX_CHUNK = 8, 14, 3
HELD_OUT_SEED = 1234  # the seed of the held-out evaluation prompts (training uses other seeds)
WARMUP_NOTE = "It trains the mechanism the task tests, on longer repeats than the task's chunks."
DESCRIPTION = (f"Prompts of {MIN_LENGTH}-{MAX_LENGTH} distinct words from {len(WORDS)}, then a copy of a chunk of "
               f"1-{MAX_CHUNK} of them taken from anywhere in the sequence; the model must predict the word that "
               "followed the chunk:")


def vocabulary() -> list[str]:
    """All words of the task, special tokens first (their ids are 0..3)."""
    return list(SPECIALS) + list(WORDS)


def _example(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(MIN_LENGTH, MAX_LENGTH))
    size = rng.randint(1, MAX_CHUNK)
    start = rng.randrange(len(words) - size)          # the chunk is followed by a word
    chunk = words[start:start + size]
    positions = {"next": start + size + 1,            # +1: <bos> comes first
                 "chunk": list(range(start + 1, start + size + 1)), "size": size}
    return Example(" ".join(words + chunk), words[start + size], positions)


def make_prompts(n: int, seed: int | str) -> list[Example]:
    """``n`` examples drawn deterministically from ``seed`` (same arguments, same list; str seeds too)."""
    rng = random.Random(seed)
    return [_example(rng) for _ in range(n)]


def group(example: Example) -> str:
    """The accuracy breakdown of training reports: the chunk's length."""
    return f"chunk {example.positions['size']}"


if __name__ == "__main__":
    for prompt, answer, positions in make_prompts(3, HELD_OUT_SEED):
        print(f"{prompt}  ->  {answer}   {positions}")

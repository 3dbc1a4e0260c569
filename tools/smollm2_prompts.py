"""The real-model prompt sets of ``make evaluate``: factual prompts (``tools/data/facts.tsv``) and
indirect-object prompts with real names, tokenized for SmolLM2 with the decisive positions known.

Every prompt starts with ``<|endoftext|>`` (SmolLM2's document separator; its tokenizer adds no
beginning-of-text token): the harness never deletes the first token, so without it the first word of a
prompt could not be ranked, deleted or kept.

>>> model, tokenizer = fxdepass.load("smollm2")                                       # doctest: +SKIP
>>> relations, prompts = facts(tokenizer)                                             # doctest: +SKIP
>>> tokenizer.decode(prompts[0].ids[list(prompts[0].decisive)])                       # doctest: +SKIP
' France'
"""
from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import torch

from fxdepass.evaluate import Prompt

__all__ = ["FACTS", "PREFIX", "IOI_TEMPLATES", "IOI_NAMES", "IOI_PLACES", "IOI_OBJECTS", "IOI_SEED", "facts", "ioi"]

FACTS = Path(__file__).resolve().parent / "data" / "facts.tsv"
PREFIX = "<|endoftext|>"
# Templates in the style of Wang et al. (2022): the subject is named twice, the indirect object once.
IOI_TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
    "While {A} and {B} were working at the {place}, {S} gave a {object} to",
    "When {A} and {B} got a {object} at the {place}, {S} decided to give it to",
    "Then, {A} and {B} went to the {place}. {S} handed a {object} to",
    "After the lunch, {A} and {B} went to the {place}. {S} gave a {object} to",
)
IOI_NAMES = ("Mary", "John", "Tom", "Sarah", "James", "Anna", "David", "Emma", "Michael", "Lisa", "Robert", "Kate",
             "Paul", "Laura", "Mark", "Alice", "Peter", "Susan", "Daniel", "Rachel", "Kevin", "Linda", "Steven",
             "Julia", "Brian", "Helen", "Eric", "Amy", "Jason", "Grace")
IOI_PLACES = ("store", "park", "school", "office", "hospital", "restaurant")
IOI_OBJECTS = ("drink", "book", "ring", "letter", "bone", "kiss")
IOI_SEED = 0


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of ``PREFIX + text`` and each token's character span in ``text`` (the prefix's is (-1, -1))."""
    prefix = tokenizer.convert_tokens_to_ids(PREFIX)
    if prefix is None or tokenizer.convert_ids_to_tokens(prefix) != PREFIX:
        raise ValueError(f"the tokenizer has no {PREFIX} token")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [prefix, *encoded.input_ids], [(-1, -1), *encoded.offset_mapping]


def _first_token(tokenizer: Any, word: str) -> int:
    return tokenizer.encode(" " + word, add_special_tokens=False)[0]


def facts(tokenizer: Any, path: Path = FACTS) -> tuple[list[str], list[Prompt]]:
    """Every row of the facts file as a prompt (target: the answer's first token; decisive: the tokens of
    the subject), and each one's relation."""
    with path.open() as handle:
        rows = list(csv.DictReader((line for line in handle if not line.startswith("#")), delimiter="\t"))
    relations, prompts = [], []
    for row in rows:
        ids, spans = _encode(tokenizer, row["prompt"])
        start = row["prompt"].index(row["subject"])
        end = start + len(row["subject"])
        decisive = tuple(i for i, (a, b) in enumerate(spans) if a < end and b > start and a >= 0)
        relations.append(row["relation"])
        prompts.append(Prompt(torch.tensor(ids), _first_token(tokenizer, row["answer"]), decisive))
    return relations, prompts


def ioi(tokenizer: Any, count: int, seed: int = IOI_SEED) -> tuple[list[str], list[Prompt]]:
    """``count`` indirect-object prompts drawn deterministically from ``seed``, templates in turn, the name
    order ABBA or BABA at random: target the indirect object, foil the subject, decisive the indirect
    object's mention.  Returns each one's ``"template i, ABBA|BABA"`` and the prompts."""
    rng = random.Random(seed)
    groups, prompts = [], []
    for index in range(count):
        template = IOI_TEMPLATES[index % len(IOI_TEMPLATES)]
        indirect, subject = rng.sample(IOI_NAMES, 2)
        order = rng.choice(("ABBA", "BABA"))
        first, second = (indirect, subject) if order == "ABBA" else (subject, indirect)
        text = template.format(A=first, B=second, S=subject, place=rng.choice(IOI_PLACES),
                               object=rng.choice(IOI_OBJECTS))
        ids, spans = _encode(tokenizer, text)
        mention = text.index(indirect)
        io = next(i for i, (a, b) in enumerate(spans) if a <= mention < b)
        groups.append(f"template {index % len(IOI_TEMPLATES)}, {order}")
        prompts.append(Prompt(torch.tensor(ids), _first_token(tokenizer, indirect), (io,),
                              foil=_first_token(tokenizer, subject)))
    return groups, prompts

"""What :meth:`~fxdepass.api.DecomposedModel.attribute` accepts as a prompt, turned into token ids and a mask.

A prompt may be text, several texts, a tokenizer's output or token ids:

>>> encode("The capital of France is", tokenizer=tokenizer)                              # doctest: +SKIP
Encoded(input_ids=tensor([[ 504, 3575,  282, 4649,  314]]), attention_mask=None, texts=['The capital of France is'])
>>> encode(["a b", "a b c"], tokenizer=tokenizer).attention_mask                          # doctest: +SKIP
tensor([[0, 1, 1],
        [1, 1, 1]])

Texts are tokenized one by one (the tokenizer's own special tokens, e.g. a BOS token, included) and padded
here rather than by the tokenizer, so that a tokenizer without a pad token works and is never changed:
padding goes on the left for causal models (the last position is every prompt's last token) and on the
right otherwise, with the tokenizer's pad token (else its end-of-sequence token, else 0), masked out.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Sequence

import torch

from .errors import InvalidInputError

__all__ = ["Encoded", "encode", "pad", "tokenize", "pad_id"]


class Encoded(NamedTuple):
    """Token ids (not yet checked against the model), their mask (``None``: every token counts) and the texts
    they came from (``None`` for ids)."""

    input_ids: Any
    attention_mask: Any
    texts: list[str] | None


def encode(inputs: Any, attention_mask: Any = None, *, tokenizer: Any = None, left: bool = True,
           device: torch.device | str | None = None) -> Encoded:
    """``inputs`` (a string, a list of strings, a ``BatchEncoding`` or mapping with ``input_ids``, or token ids)
    as ids and a mask; texts need ``tokenizer`` and are padded on the left when ``left`` (causal models).

    >>> encode([[5, 9, 2]]).input_ids
    [[5, 9, 2]]
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    if _is_texts(inputs):
        if attention_mask is not None:
            raise InvalidInputError("attention_mask is made from the texts; give it only with token ids")
        rows = [tokenize(text, tokenizer) for text in inputs]
        ids, mask = pad(rows, pad_id(tokenizer), left=left, device=device)
        return Encoded(ids, mask if bool((mask == 0).any()) else None, list(inputs))
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise InvalidInputError(f"a mapping of inputs needs 'input_ids' (it has {sorted(map(str, inputs))})")
        if attention_mask is not None and inputs.get("attention_mask") is not None:
            raise InvalidInputError("attention_mask given twice: in the tokenizer's output and as an argument")
        mask = inputs.get("attention_mask", attention_mask)
        return Encoded(_rectangular(inputs["input_ids"], "input_ids"), _rectangular(mask, "attention_mask"), None)
    return Encoded(inputs, attention_mask, None)


def pad(rows: Sequence[Sequence[int]], pad_id: int, *, left: bool,
        device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids as one ``[batch, longest]`` tensor and its attention mask, padded on the left or right,
    made on ``device`` (the model's).

    >>> pad([[7], [8, 9]], 0, left=True)
    (tensor([[0, 7],
            [8, 9]]), tensor([[0, 1],
            [1, 1]]))
    """
    longest = max(len(row) for row in rows)
    padded, kept = [], []
    for row in rows:
        padding = longest - len(row)
        padded.append([int(pad_id)] * padding + list(row) if left else list(row) + [int(pad_id)] * padding)
        kept.append([0] * padding + [1] * len(row) if left else [1] * len(row) + [0] * padding)
    return (torch.tensor(padded, dtype=torch.long, device=device), torch.tensor(kept, dtype=torch.long, device=device))


def _is_texts(inputs: Any) -> bool:
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs):
        return True
    if isinstance(inputs, (list, tuple)) and any(isinstance(t, str) for t in inputs):
        raise InvalidInputError("a list of prompts must hold only strings (or only token ids)")
    return False


def tokenize(text: str, tokenizer: Any) -> list[int]:
    """The token ids of ``text``, with the tokenizer's own special tokens; a clear error without a tokenizer.

    >>> tokenize("w5 w17", tiny.tokenizer())                                         # doctest: +SKIP
    [5, 17]
    """
    if tokenizer is None:
        raise InvalidInputError("text prompts need a tokenizer: fxdepass.compile(model, tokenizer=tokenizer), "
                                "or give token ids")
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise InvalidInputError(f"the prompt {text!r} tokenizes to no tokens")
    return ids


def pad_id(tokenizer: Any) -> int:
    """The id padding uses: the tokenizer's pad token, else its end-of-sequence token, else 0.

    >>> pad_id(None)
    0
    """
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _rectangular(value: Any, name: str) -> Any:
    """A tokenizer's lists (``return_tensors`` not given) as a tensor; ragged rows say to pad them."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    rows = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(rows, (list, tuple)) and rows and isinstance(rows[0], (list, tuple)):
        if len({len(r) for r in rows}) > 1:
            raise InvalidInputError(f"{name} rows have different lengths; tokenize with padding=True "
                                    "(or pass the texts themselves)")
    try:
        return torch.as_tensor(rows)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InvalidInputError(f"{name} must be token ids: {error}") from None

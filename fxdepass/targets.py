"""Targets: the scalar of the logits an attribution explains, as a linear functional of them (SPEC §3).

A target is, at each read position, ``Σ_v c_v · z_v + o`` for coefficients ``c`` over the vocabulary and a
constant ``o``, both computed from the *real* logits ``z`` and then frozen.  The decomposition is linear at
the readout, so each component's share of the target is ``Σ_v c_v · z_{m,v}`` and the constant goes to rest:
the shares add up to the target exactly.

* :class:`Token`: the logit ``z_t`` (``c`` one-hot);
* :class:`Predicted`: the logit of the argmax token at each read position (the default);
* :func:`diff`: ``z_a − z_b`` (a logit difference; any two targets);
* :func:`logprob`: ``log p_t`` with the output softmax's normaliser frozen at the real run —
  ``log p_t = (z_t − Σ_v p_v z_v) − H(p)``: the bracket is linear in the logits (``c = onehot(t) − p``), the
  frozen entropy term ``−H(p) = Σ_v p_v log p_v`` is the constant, given to rest.

>>> decomposed.attribute("The capital of France is", targets=" Paris")                       # doctest: +SKIP
>>> decomposed.attribute(ids, targets=fxdepass.diff(" Paris", " Berlin"))                     # doctest: +SKIP
>>> decomposed.attribute(ids, targets=fxdepass.logprob(" Paris")).scores()                    # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from .checks import has_data
from .errors import InvalidInputError

__all__ = ["Target", "Token", "Predicted", "TokenAt", "Diff", "LogProb", "diff", "logprob", "as_target", "per_prompt"]


class Target:
    """A linear functional of the logits at each read position (module docstring).

    Every method takes the real logits of one prompt at its read positions, ``[positions, vocabulary]``.
    """

    def coefficients(self, logits: torch.Tensor) -> torch.Tensor:
        """``c``, ``[positions, vocabulary]``: the weight of each logit in the target."""
        raise NotImplementedError

    def constant(self, logits: torch.Tensor) -> torch.Tensor:
        """``o``, ``[positions]``: the frozen part, which goes to rest (zero unless the target has one)."""
        return logits.new_zeros(logits.shape[0])

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        """The target's real value, ``[positions]``, computed directly (the reconstruction is checked against it)."""
        raise NotImplementedError

    def label(self, tokenizer: Any) -> str:
        raise NotImplementedError

    def resolve(self, tokenizer: Any, vocabulary: int | None) -> "Target":
        """This target with token strings replaced by checked ids."""
        return self


def _one_hot(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    hot = torch.zeros_like(logits)
    return hot.scatter_(-1, tokens.view(-1, 1).expand(logits.shape[0], 1), 1.0)


def _text(token: int, tokenizer: Any) -> str:
    return repr(tokenizer.decode([token])) if tokenizer is not None else str(token)


def token_id(token: Any, tokenizer: Any, vocabulary: int | None) -> int:
    """The id of ``token`` — an id, or a string that is exactly one token — checked against the vocabulary.

    >>> token_id(5, None, 10)
    5
    """
    if isinstance(token, torch.Tensor) and token.numel() == 1 and not token.dtype.is_floating_point:
        token = int(has_data(token, "a target token"))
    if isinstance(token, str):
        if tokenizer is None:
            raise InvalidInputError(f"target {token!r} is text: compile with tokenizer=… or give a token id")
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise InvalidInputError(f"target {token!r} is {len(ids)} tokens, {pieces} (ids {ids}), not one; "
                                    "give one token (e.g. its first piece) or its id")
        token = ids[0]
    if isinstance(token, bool) or not isinstance(token, int):
        raise InvalidInputError(f"a target token is an integer id or a string, got {token!r} ({type(token).__name__})")
    if token < 0 or (vocabulary is not None and token >= vocabulary):
        raise InvalidInputError(f"target {token} is outside the vocabulary (size {vocabulary})")
    return int(token)


@dataclasses.dataclass(frozen=True)
class Token(Target):
    """The logit of one token (an id, or a string that is one token) at every read position."""

    token: int | str

    def resolve(self, tokenizer: Any, vocabulary: int | None) -> "Token":
        return Token(token_id(self.token, tokenizer, vocabulary))

    def coefficients(self, logits: torch.Tensor) -> torch.Tensor:
        return _one_hot(torch.tensor(self.token, device=logits.device), logits)

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, self.token]

    def label(self, tokenizer: Any) -> str:
        return _text(self.token, tokenizer)


@dataclasses.dataclass(frozen=True)
class Predicted(Target):
    """The logit of the token the model predicts (the argmax of the real logits) at each read position."""

    def coefficients(self, logits: torch.Tensor) -> torch.Tensor:
        return _one_hot(logits.argmax(-1), logits)

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.max(-1).values

    def label(self, tokenizer: Any) -> str:
        return "the predicted token"


@dataclasses.dataclass(frozen=True)
class TokenAt(Target):
    """One token per read position (``tokens[i]`` at the i-th read position): generated text's own tokens."""

    tokens: tuple[int, ...]

    def _ids(self, logits: torch.Tensor) -> torch.Tensor:
        if len(self.tokens) != logits.shape[0]:
            raise InvalidInputError(f"{len(self.tokens)} target tokens for {logits.shape[0]} read positions")
        return torch.tensor(self.tokens, device=logits.device)

    def resolve(self, tokenizer: Any, vocabulary: int | None) -> "TokenAt":
        return TokenAt(tuple(token_id(t, tokenizer, vocabulary) for t in self.tokens))

    def coefficients(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(logits).scatter_(-1, self._ids(logits).view(-1, 1), 1.0)

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.gather(-1, self._ids(logits).view(-1, 1)).squeeze(-1)

    def label(self, tokenizer: Any) -> str:
        return ", ".join(_text(t, tokenizer) for t in self.tokens)


@dataclasses.dataclass(frozen=True)
class Diff(Target):
    """``first − second`` (each a target): a logit difference such as IO − S, exact since both are linear."""

    first: Target
    second: Target

    def resolve(self, tokenizer: Any, vocabulary: int | None) -> "Diff":
        return Diff(self.first.resolve(tokenizer, vocabulary), self.second.resolve(tokenizer, vocabulary))

    def coefficients(self, logits: torch.Tensor) -> torch.Tensor:
        return self.first.coefficients(logits) - self.second.coefficients(logits)

    def constant(self, logits: torch.Tensor) -> torch.Tensor:
        return self.first.constant(logits) - self.second.constant(logits)

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        return self.first.value(logits) - self.second.value(logits)

    def label(self, tokenizer: Any) -> str:
        return f"{self.first.label(tokenizer)} − {self.second.label(tokenizer)}"


@dataclasses.dataclass(frozen=True)
class LogProb(Target):
    """``log p_t`` with the output softmax's normaliser frozen (module docstring): ``c = onehot(t) − p``, and
    the frozen ``−H(p)`` is rest's.  ``token`` is one token (:class:`Token`) or one per read position
    (:class:`TokenAt`, generated text's own tokens)."""

    token: Token | TokenAt

    def resolve(self, tokenizer: Any, vocabulary: int | None) -> "LogProb":
        return LogProb(self.token.resolve(tokenizer, vocabulary))

    # in place: these are [positions, vocabulary], the largest tensors of a read at every position
    def coefficients(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1).neg_().add_(self.token.coefficients(logits))

    def constant(self, logits: torch.Tensor) -> torch.Tensor:
        # −H(p) = Σ_v p_v log p_v; xlogy keeps p_v = 0 (underflow) at 0 instead of 0·(−inf)
        p = logits.softmax(-1)
        return p.xlogy_(p).sum(-1)

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        return self.token.value(logits.log_softmax(-1))  # the token's entry, read from log p instead of z

    def label(self, tokenizer: Any) -> str:
        return f"log p({self.token.label(tokenizer)})"


def as_target(spec: Any) -> Target:
    """A :class:`Target` for ``spec``: a target, a token id or a one-token string (its logit), or ``None``
    (the predicted token).

    >>> as_target(5)
    Token(token=5)
    """
    if spec is None:
        return Predicted()
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, torch.Tensor) and spec.numel() == 1:
        has_data(spec, "a target")
        if spec.dtype.is_floating_point or spec.dtype.is_complex or spec.dtype == torch.bool:
            raise InvalidInputError(f"a target token id must be an integer, got a {spec.dtype} tensor")
        return Token(int(spec))
    if isinstance(spec, str) or (isinstance(spec, int) and not isinstance(spec, bool)):
        return Token(spec)
    raise InvalidInputError(f"a target is a token id, a one-token string, fxdepass.diff(a, b), fxdepass.logprob(t), "
                            f"'all' or None; got {spec!r} ({type(spec).__name__})")


def diff(first: Any, second: Any) -> Diff:
    """The difference of two targets (token ids, one-token strings or targets): ``z_first − z_second``.

    >>> diff(3, 7)
    Diff(first=Token(token=3), second=Token(token=7))
    """
    return Diff(as_target(first), as_target(second))


def logprob(token: int | str) -> LogProb:
    """The log-probability of ``token`` with the output softmax's normaliser frozen at the real run.

    >>> logprob(3)
    LogProb(token=Token(token=3))
    """
    return LogProb(Token(token))


def per_prompt(targets: Any, batch: int, tokenizer: Any, vocabulary: int | None) -> list[Target]:
    """One resolved target per prompt: ``targets`` is one target spec (:func:`as_target`) for every prompt, a
    list of ``batch`` specs, or an integer tensor ``[batch, positions]`` of one token per read position.

    >>> per_prompt(5, 2, None, 10)
    [Token(token=5), Token(token=5)]
    """
    if isinstance(targets, torch.Tensor):
        has_data(targets, "targets")
    if isinstance(targets, torch.Tensor) and targets.ndim == 2:
        if targets.shape[0] != batch or targets.dtype.is_floating_point or targets.dtype.is_complex:
            raise InvalidInputError(f"a targets tensor holds integer ids [batch={batch}, positions], got "
                                    f"{tuple(targets.shape)} {targets.dtype}")
        specs: Sequence[Any] = [TokenAt(tuple(row)) for row in targets.tolist()]
    elif isinstance(targets, (list, tuple)):
        if len(targets) != batch:
            raise InvalidInputError(f"targets has {len(targets)} entries for {batch} prompts: give one target, "
                                    "or one per prompt")
        specs = targets
    else:
        specs = [targets] * batch
    return [as_target(spec).resolve(tokenizer, vocabulary) for spec in specs]

"""Distributed attribution: the component axis sharded across the processes of ``torch.distributed``.

Note [Sharding the component axis]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Components never interact except where a rule reduces over them (registry Note [Sharded components]),
so a run splits the sources into one contiguous range per process: every process runs the real
forward in full (the frozen probabilities, norm scales and real activations are its own), computes
its range of components, and completes each cross-component reduction with an ``all_reduce``; the
first process also holds rest.  The ranges balance the work: equal counts, except in causal blocks
(``blocked``), where a token component costs the positions it reaches (``N − m``), so earlier
ranges are shorter.  Inside a process the one-device machinery applies unchanged to its own range:
causal blocks, neuron slices, component and routed-row chunks.  The outputs' components are then
gathered, in the order of one process (sources, then rest), to the first process or to every one.

Every process must call :meth:`DecomposedModel.attribute` with the same inputs (checked) and settings;
a process that fails alone leaves the others waiting in a collective until ``torch.distributed``'s
timeout, except the memory guard, whose refusal is shared (:func:`together`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from . import registry
from .errors import FxDePassError, InvalidInputError

__all__ = ["Shard", "shard_for", "check_same_inputs", "together", "sharded", "gather"]

GATHERS = ("rank0", "all")


class Shard(registry.ComponentAxis):
    """This process's share of the component axis (Note [Sharding the component axis]).

    >>> shard = Shard(group=None, gather="rank0", causal=True)       # doctest: +SKIP
    >>> shard.bounds(10)                                             # doctest: +SKIP
    [0, 3, 10]
    """

    def __init__(self, group: Any, gather: str, causal: bool):
        import torch.distributed as dist

        self.group, self.gather, self.causal = group, gather, causal
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.rest = self.rank == 0
        self.count: int | None = None  # the sources of the run in progress

    def bounds(self, count: int) -> list[int]:
        """Where each process's range of ``count`` sources starts, and the end."""
        if count < self.world:
            raise InvalidInputError(f"a distributed run over {self.world} processes needs at least {self.world} "
                                    f"components; this seed has {count}")
        if not self.causal:
            return [round(r * count / self.world) for r in range(self.world + 1)]
        cost = [0]  # cost[b]: the positions reached by sources 0..b-1
        for m in range(count):
            cost.append(cost[-1] + count - m)
        bounds, b = [0], 0
        for r in range(1, self.world):
            while b < count and cost[b] < cost[-1] * r / self.world:
                b += 1
            bounds.append(min(max(b, bounds[-1] + 1), count - (self.world - r)))  # at least one source each
            b = bounds[-1]
        return bounds + [count]

    def held(self, count: int) -> tuple[int, int]:
        bounds = self.bounds(count)
        self.count = count
        return bounds[self.rank], bounds[self.rank + 1]

    def rows(self, count: int) -> list[int]:
        """How many components each process holds of ``count`` sources (the first one's rest included)."""
        bounds = self.bounds(count)
        return [bounds[r + 1] - bounds[r] + (r == 0) for r in range(self.world)]

    def reduce(self, value: torch.Tensor, op: str) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(value, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op],
                        group=self.group)
        return value

    def numbers(self, rows: int, device: torch.device) -> torch.Tensor:
        if self.count is None:
            raise FxDePassError("a rule numbered its components before the seed split them")
        start = self.bounds(self.count)[self.rank]
        numbers = torch.arange(start, start + rows - self.rest, device=device)
        return torch.cat((numbers, torch.tensor([self.count], device=device))) if self.rest else numbers


def shard_for(distributed: Any, gather: str, *, causal: bool, attention: str, compiled: bool) -> Shard | None:
    """The shard of this process for ``attribute(..., distributed=…, gather=…)``, or ``None`` when not distributed.

    ``distributed`` is ``False``, ``True`` (the default process group) or a process group.
    """
    if distributed is False or distributed is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidInputError("distributed=True needs torch.distributed initialised (torch.distributed.init_process_group, "
                                "or the fxdepass command line under torchrun)")
    if gather not in GATHERS:
        raise InvalidInputError(f"gather={gather!r}; choose one of {GATHERS}")
    if attention == "routed":
        raise InvalidInputError("attention='routed' compares every component with rest at each (query, key): "
                                "it runs in one process only")
    if compiled:
        raise InvalidInputError("torch_compile=True runs in one process only; compile without it for distributed=True")
    return Shard(None if distributed is True else distributed, gather, causal)


def check_same_inputs(ids: torch.Tensor, shard: Shard) -> None:
    """Raise on every process unless every process was given the same token ids."""
    flat = ids.reshape(-1).long()
    weights = torch.arange(1, flat.numel() + 1, device=flat.device)
    summary = torch.stack((torch.tensor(ids.shape[0], device=flat.device), torch.tensor(ids.shape[-1], device=flat.device),
                           (flat * weights).sum(), (flat * weights.flip(0)).sum()))
    low, high = shard.reduce(summary.clone(), "min"), shard.reduce(summary.clone(), "max")
    if not torch.equal(low, high):
        raise InvalidInputError("distributed=True: the processes were given different input ids; "
                                "every process must attribute the same prompts")


@contextlib.contextmanager
def together(shard: Shard | None) -> Iterator[None]:
    """Run the block on every process; if it raises ``FxDePassError`` on any, raise on all of them."""
    if shard is None:
        yield
        return
    failed: FxDePassError | None = None
    try:
        yield
    except FxDePassError as error:
        failed = error
    flag = shard.reduce(torch.tensor([float(failed is not None)], device=_device(shard)), "max")
    if failed is not None:
        raise failed
    if flag.item():
        raise InvalidInputError("distributed=True: another process refused the run (see its error)")


def _device(shard: Shard) -> torch.device:
    """Where the process group's collectives take tensors: the current CUDA device under NCCL, else the CPU."""
    import torch.distributed as dist

    backend = dist.get_backend(shard.group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def sharded(shard: Shard | None) -> contextlib.AbstractContextManager:
    """The context a sharded pass runs in (nothing to do without a shard)."""
    return contextlib.nullcontext() if shard is None else registry.on_component_axis(shard)


def gather(outputs: tuple, shard: Shard) -> tuple | None:
    """The pass's ``(real, components)`` outputs with every process's components, in one process's order
    (sources, then rest); ``None`` on a process that does not receive them (``gather="rank0"``)."""
    import torch.distributed as dist

    if shard.count is None:
        raise FxDePassError("the distributed pass made no components")
    rows = shard.rows(shard.count)
    receives = shard.gather == "all" or shard.rank == 0
    results = []
    for real, components in outputs:
        if components.shape[0] != rows[shard.rank]:
            raise FxDePassError(f"process {shard.rank} holds {components.shape[0]} components, expected {rows[shard.rank]}")
        padded = torch.cat((components, components.new_zeros(max(rows) - components.shape[0], *components.shape[1:])))
        bucket = [torch.empty_like(padded) for _ in rows] if receives else None
        if shard.gather == "all":
            dist.all_gather(bucket, padded.contiguous(), group=shard.group)
        else:
            first = 0 if shard.group is None else dist.get_global_rank(shard.group, 0)
            dist.gather(padded.contiguous(), bucket, dst=first, group=shard.group)
        if receives:
            parts = [part[:count] for part, count in zip(bucket, rows)]
            results.append((real, torch.cat((parts[0][:-1], *parts[1:], parts[0][-1:]))))
        del padded, bucket
    return tuple(results) if receives else None

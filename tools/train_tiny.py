"""Train the tiny key-value recall model shipped in ``models/kv-recall`` (deterministic, CPU, a few minutes).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/train_tiny.py

Builds a word-level tokenizer for the task of ``tools/tasks.py``, trains a small ``LlamaForCausalLM``
on freshly drawn prompts with the loss on the answer token only, stops once the held-out answer
accuracy reaches ``--target`` (checked every ``--eval-every`` steps), and writes ``config.json``,
``model.safetensors``, the tokenizer files and a generated ``TRAINING.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tasks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "models" / "kv-recall"
HELD_OUT = 1000


def build_tokenizer() -> Tokenizer:
    """Word-level tokenizer over the task's words: whitespace split, ``<bos>`` prepended."""
    vocab = {word: index for index, word in enumerate(tasks.vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = vocab["<bos>"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)])
    tokenizer.add_special_tokens(list(tasks.SPECIALS))
    return tokenizer


def build_model(vocab_size: int, args: argparse.Namespace) -> transformers.LlamaForCausalLM:
    vocab = tasks.vocabulary()
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=vocab.index("<pad>"),
        bos_token_id=vocab.index("<bos>"),
        eos_token_id=vocab.index("<eos>"),
    )
    return transformers.LlamaForCausalLM(config)


def encode(tokenizer: Tokenizer, prompts: list[str], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids ``[B, L]`` and the index of each prompt's last token ``[B]``."""
    encodings = tokenizer.encode_batch(prompts)
    lengths = torch.tensor([len(e.ids) for e in encodings])
    ids = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = torch.tensor(encoding.ids)
    return ids, lengths - 1


def answer_logits(model: torch.nn.Module, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Logits at each prompt's last token (right padding is harmless under causal attention)."""
    hidden = model.model(input_ids=ids).last_hidden_state
    return model.lm_head(hidden[torch.arange(len(ids)), last])


@torch.no_grad()
def accuracy(model, tokenizer, examples, pad_id, batch: int = 250) -> tuple[float, dict[int, float]]:
    """Argmax accuracy over the whole vocabulary, overall and by number of facts."""
    model.eval()
    hits: list[bool] = []
    for start in range(0, len(examples), batch):
        chunk = examples[start: start + batch]
        ids, last = encode(tokenizer, [e.prompt for e in chunk], pad_id)
        predicted = answer_logits(model, ids, last).argmax(-1)
        answers = torch.tensor([tokenizer.token_to_id(e.answer) for e in chunk])
        hits += (predicted == answers).tolist()
    model.train()
    by_facts: dict[int, list[bool]] = {}
    for example, hit in zip(examples, hits):
        by_facts.setdefault(len(example.positions["values"]), []).append(hit)
    return sum(hits) / len(hits), {k: sum(v) / len(v) for k, v in sorted(by_facts.items())}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--target", type=float, default=0.99, help="stop once held-out accuracy reaches this")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    tokenizer = build_tokenizer()
    pad_id = tokenizer.token_to_id("<pad>")
    model = build_model(tokenizer.get_vocab_size(), args)
    model.train()
    parameters = sum(p.numel() for p in model.parameters())

    held_out = tasks.make_prompts(HELD_OUT, tasks.HELD_OUT_SEED)
    held_out_prompts = {e.prompt for e in held_out}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)

    def learning_rate(step: int) -> float:  # linear warm-up, then cosine decay to 10% over max_steps
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.max_steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate)
    print(f"kv-recall: {parameters:,} parameters, {args.layers} layers, hidden {args.hidden}, "
          f"vocab {tokenizer.get_vocab_size()}, batch {args.batch}, {args.threads} thread(s)")
    recent: list[float] = []
    held_out_accuracy, by_facts, steps, skipped = 0.0, {}, 0, 0
    for step in range(1, args.max_steps + 1):
        # Training prompts: fresh every step, seeded by (seed, step), never a held-out prompt.
        batch = [e for e in tasks.make_prompts(args.batch, seed=f"train-{args.seed}-{step}")
                 if e.prompt not in held_out_prompts]
        skipped += args.batch - len(batch)
        ids, last = encode(tokenizer, [e.prompt for e in batch], pad_id)
        answers = torch.tensor([tokenizer.token_to_id(e.answer) for e in batch])
        loss = torch.nn.functional.cross_entropy(answer_logits(model, ids, last), answers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        recent = (recent + [loss.item()])[-50:]
        steps = step
        if step % args.eval_every == 0 or step == args.max_steps:
            held_out_accuracy, by_facts = accuracy(model, tokenizer, held_out, pad_id)
            print(f"  step {step:5d}  loss {sum(recent) / len(recent):.4f}  held-out accuracy {held_out_accuracy:.3f}"
                  f"  ({time.perf_counter() - started:.0f}s)", flush=True)
            if held_out_accuracy >= args.target:
                break
    final_loss = sum(recent) / len(recent)
    train_seconds = time.perf_counter() - started

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save(str(args.out / "tokenizer.json"))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(args.out / "tokenizer.json"), bos_token="<bos>", eos_token="<eos>",
        pad_token="<pad>", unk_token="<unk>", model_max_length=64)
    fast.save_pretrained(args.out)
    wall_seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file() and f.name != "TRAINING.md")

    result = dict(parameters=parameters, steps=steps, final_loss=final_loss, accuracy=held_out_accuracy,
                  by_facts=by_facts, train_seconds=train_seconds, wall_seconds=wall_seconds, size=size,
                  skipped=skipped)
    (args.out / "TRAINING.md").write_text(report(args, result, argv))
    print(f"done: {steps} steps, final loss {final_loss:.4f} (mean of last {len(recent)} steps), held-out accuracy "
          f"{held_out_accuracy:.3f} on {HELD_OUT} prompts, {wall_seconds:.1f}s wall, {size / 1024:.0f} KiB "
          f"-> {display(args.out)}")
    if held_out_accuracy < 0.95:
        raise SystemExit(f"held-out accuracy {held_out_accuracy:.3f} is below 0.95")
    return result


def display(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def report(args: argparse.Namespace, r: dict, argv: list[str] | None) -> str:
    extra = " ".join(argv if argv is not None else sys.argv[1:])
    command = "OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/train_tiny.py" + (f" {extra}" if extra else "")
    example = tasks.make_prompts(1, tasks.HELD_OUT_SEED)[0]
    by_facts = ", ".join(f"{k} facts {v:.3f}" for k, v in r["by_facts"].items())
    return f"""# kv-recall: a tiny trained Llama for key-value recall

Generated by `tools/train_tiny.py`; do not edit by hand.  Regenerate (from the repository root) with

    {command}

## Task

Prompts of {tasks.MIN_FACTS}-{tasks.MAX_FACTS} facts `NAME has VALUE .` (distinct names from {len(tasks.NAMES)}, distinct values
from {len(tasks.VALUES)}), then a question about one name; the model must predict that name's value at the `?`:

    <bos> {example.prompt}   ->   {example.answer}

The tokenizer (`tokenizer.json`, word level, whitespace split) prepends `<bos>` itself.  Prompts come
from `tools/tasks.py`: `make_prompts(n, seed)`; held-out prompts are `make_prompts({HELD_OUT}, {tasks.HELD_OUT_SEED})`
and are excluded from training ({r["skipped"]} drawn training prompts were dropped as duplicates of them).
The loss is on the answer token only; other positions are untrained.

## Model

`LlamaForCausalLM`: {args.layers} layers, hidden {args.hidden}, {args.heads} heads ({args.kv_heads} key-value heads),
intermediate {args.intermediate}, vocabulary {len(tasks.vocabulary())}, untied embeddings, float32.

| | |
|---|---|
| parameters | {r["parameters"]:,} |
| steps | {r["steps"]} (batch {args.batch}, AdamW lr {args.lr}, warm-up {args.warmup}, cosine over {args.max_steps}) |
| final training loss | {r["final_loss"]:.4f} (mean of the last 50 steps) |
| held-out accuracy | {r["accuracy"]:.3f} on {HELD_OUT} prompts ({by_facts}); argmax over the whole vocabulary |
| wall time | {r["wall_seconds"]:.1f} s ({args.threads} thread(s), {platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}) |
| files | {r["size"] / 1024:.0f} KiB |
| seed | {args.seed} (deterministic algorithms on) |
"""


if __name__ == "__main__":
    main()

"""Train the tiny key-value recall model shipped in ``models/kv-recall`` (deterministic, CPU, a few minutes).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/train_tiny.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/train_tiny.py --task ioi     # -> models/ioi

Builds a word-level tokenizer for the task of ``tools/tasks.py`` (or another task of :data:`TASKS`: each
is a module with the same interface) and trains a small ``LlamaForCausalLM`` in two phases:

1. *induction warm-up* (``--warmup-steps``): random sequences of task words in which a block of
   12 words is repeated after a random gap; loss on every token of the repeat.  Many targets per
   sequence form previous-token and induction heads within a few hundred steps.
2. *task*: freshly drawn key-value prompts with the loss on the answer token only, until the
   held-out answer accuracy reaches ``--target`` (checked every ``--eval-every`` steps).

With only one target per prompt, a model trained on the task alone sits for thousands of steps at
"any value of the prompt" (accuracy about 1/number of facts); the warm-up removes that plateau.
Writes ``config.json``, ``model.safetensors``, the tokenizer files and a generated ``TRAINING.md``
into ``--out`` (default ``models/<task>``).
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from pathlib import Path
from types import ModuleType

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tasks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = 1000
#: --task → its module in tools/: ``vocabulary()`` (``tasks.SPECIALS`` first), ``make_prompts(n, seed)``,
#: ``HELD_OUT_SEED``, ``group(example)`` (the accuracy breakdown) and the report's ``TITLE``, ``DESCRIPTION``
#: and ``WARMUP_NOTE``
TASKS = {"kv-recall": "tasks", "ioi": "ioi", "induction": "induction"}


def build_tokenizer(task: ModuleType = tasks) -> Tokenizer:
    """Word-level tokenizer over the task's words: whitespace split, ``<bos>`` prepended."""
    vocab = {word: index for index, word in enumerate(task.vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = vocab["<bos>"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)])
    tokenizer.add_special_tokens(list(tasks.SPECIALS))
    return tokenizer


def build_model(vocab_size: int, args: argparse.Namespace) -> transformers.LlamaForCausalLM:
    vocab = tasks.vocabulary()  # every task's vocabulary starts with tasks.SPECIALS: the same special ids
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="eager",   # fastest for a model this small; sdpa computes the same function
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


def warmup_batch(generator: torch.Generator, batch: int, vocab_size: int) -> tuple[torch.Tensor, slice]:
    """Induction data: random words, 12 distinct words, 0-20 random words, the same 12 words again.

    Returns ids ``[batch, 44]`` (20 random words in all, split around the first block so that every
    row has the same length) and the slice of positions whose next token is predictable (the repeat).
    """
    first = len(tasks.SPECIALS)                      # ordinary words only
    rows = []
    for _ in range(batch):
        block = torch.randperm(vocab_size - first, generator=generator)[:12] + first
        gap = int(torch.randint(0, 21, (1,), generator=generator))
        noise = torch.randint(first, vocab_size, (20,), generator=generator)
        rows.append(torch.cat([noise[gap:], block, noise[:gap], block]))
    return torch.stack(rows), slice(-12, -1)


def answer_logits(model: torch.nn.Module, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Logits at each prompt's last token (right padding is harmless under causal attention)."""
    hidden = model.model(input_ids=ids).last_hidden_state
    return model.lm_head(hidden[torch.arange(len(ids)), last])


@torch.no_grad()
def accuracy(model, tokenizer, examples, pad_id, group=tasks.group, batch: int = 250) -> tuple[float, dict[str, float]]:
    """Argmax accuracy over the whole vocabulary, overall and by ``group(example)`` (number of facts)."""
    model.eval()
    hits: list[bool] = []
    for start in range(0, len(examples), batch):
        chunk = examples[start: start + batch]
        ids, last = encode(tokenizer, [e.prompt for e in chunk], pad_id)
        predicted = answer_logits(model, ids, last).argmax(-1)
        answers = torch.tensor([tokenizer.token_to_id(e.answer) for e in chunk])
        hits += (predicted == answers).tolist()
    model.train()
    by_group: dict[str, list[bool]] = {}
    for example, hit in zip(examples, hits):
        by_group.setdefault(group(example), []).append(hit)
    return sum(hits) / len(hits), {k: sum(v) / len(v) for k, v in sorted(by_group.items())}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, default="kv-recall")
    parser.add_argument("--out", type=Path, default=None, help="default: models/<task>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=750, help="induction warm-up steps (batch 32)")
    parser.add_argument("--max-steps", type=int, default=6000, help="at most this many task steps")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--target", type=float, default=0.99, help="stop once held-out accuracy reaches this")
    args = parser.parse_args(argv)
    args.out = args.out or ROOT / "models" / args.task
    return args


def main(argv: list[str] | None = None) -> dict:
    """Train, save and report; returns the numbers of ``TRAINING.md``.  Global torch settings
    (threads, deterministic algorithms) are restored afterwards, so callers such as the demo can
    train in-process."""
    args = parse(argv)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.set_num_threads(args.threads)
        torch.use_deterministic_algorithms(True)
        return train(args, argv)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def train(args: argparse.Namespace, argv: list[str] | None) -> dict:
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    transformers.utils.logging.disable_progress_bar()

    task = importlib.import_module(TASKS[args.task])
    tokenizer = build_tokenizer(task)
    pad_id = tokenizer.token_to_id("<pad>")
    model = build_model(tokenizer.get_vocab_size(), args)
    model.train()
    parameters = sum(p.numel() for p in model.parameters())

    held_out = task.make_prompts(HELD_OUT, task.HELD_OUT_SEED)
    held_out_prompts = {e.prompt for e in held_out}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    print(f"{args.task}: {parameters:,} parameters, {args.layers} layers, hidden {args.hidden}, "
          f"vocab {tokenizer.get_vocab_size()}, {args.threads} thread(s)")

    generator = torch.Generator().manual_seed(args.seed)
    warmup_loss = float("nan")
    for step in range(1, args.warmup_steps + 1):
        ids, targets = warmup_batch(generator, 32, tokenizer.get_vocab_size())
        logits = model(input_ids=ids).logits
        shifted = slice(targets.start + 1, None)
        loss = torch.nn.functional.cross_entropy(logits[:, targets].flatten(0, 1), ids[:, shifted].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        warmup_loss = loss.item()
        if step % args.eval_every == 0 or step == args.warmup_steps:
            print(f"  warm-up {step:4d}  induction loss {warmup_loss:.4f}  ({time.perf_counter() - started:.0f}s)",
                  flush=True)

    recent: list[float] = []
    held_out_accuracy, by_group, steps, skipped = 0.0, {}, 0, 0
    for step in range(1, args.max_steps + 1):
        # Training prompts: fresh every step, seeded by (seed, step), never a held-out prompt.
        batch = [e for e in task.make_prompts(args.batch, seed=f"train-{args.seed}-{step}")
                 if e.prompt not in held_out_prompts]
        skipped += args.batch - len(batch)
        ids, last = encode(tokenizer, [e.prompt for e in batch], pad_id)
        answers = torch.tensor([tokenizer.token_to_id(e.answer) for e in batch])
        loss = torch.nn.functional.cross_entropy(answer_logits(model, ids, last), answers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent = (recent + [loss.item()])[-50:]
        steps = step
        if step % args.eval_every == 0 or step == args.max_steps:
            held_out_accuracy, by_group = accuracy(model, tokenizer, held_out, pad_id, task.group)
            print(f"  task {step:5d}  loss {sum(recent) / len(recent):.4f}  held-out accuracy {held_out_accuracy:.3f}"
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

    result = dict(parameters=parameters, steps=steps, warmup_loss=warmup_loss, final_loss=final_loss, accuracy=held_out_accuracy,
                  by_group=by_group, train_seconds=train_seconds, wall_seconds=wall_seconds, size=size,
                  skipped=skipped)
    (args.out / "TRAINING.md").write_text(report(args, task, result, argv))
    print(f"done: {args.warmup_steps} warm-up + {steps} task steps, final loss {final_loss:.4f} (mean of last {len(recent)} steps), held-out accuracy "
          f"{held_out_accuracy:.3f} on {HELD_OUT} prompts ("
          + ", ".join(f"{k} {v:.3f}" for k, v in by_group.items()) + f"), {wall_seconds:.1f}s wall, {size / 1024:.0f} KiB "
          f"-> {display(args.out)}")
    if held_out_accuracy < 0.95:
        raise SystemExit(f"held-out accuracy {held_out_accuracy:.3f} is below 0.95")
    return result


def display(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def report(args: argparse.Namespace, task: ModuleType, r: dict, argv: list[str] | None) -> str:
    extra = " ".join(argv if argv is not None else sys.argv[1:])
    command = "OMP_WAIT_POLICY=PASSIVE .venv/bin/python tools/train_tiny.py" + (f" {extra}" if extra else "")
    example = task.make_prompts(1, task.HELD_OUT_SEED)[0]
    by_group = ", ".join(f"{k} {v:.3f}" for k, v in r["by_group"].items())
    return f"""# {args.task}: a tiny trained Llama for {task.TITLE}

Generated by `tools/train_tiny.py`; do not edit by hand.  Regenerate (from the repository root) with

    {command}

## Task

{task.DESCRIPTION}

    <bos> {example.prompt}   ->   {example.answer}

The tokenizer (`tokenizer.json`, word level, whitespace split) prepends `<bos>` itself.  Prompts come
from `tools/{task.__name__}.py`: `make_prompts(n, seed)`; held-out prompts are `make_prompts({HELD_OUT}, {task.HELD_OUT_SEED})`
and are excluded from training ({r["skipped"]} drawn training prompts were dropped as duplicates of them).

## Training

1. Induction warm-up, {args.warmup_steps} steps of batch 32: random sequences of task words in which 12 distinct
   words repeat after a random gap of 0-20 words, loss on the repeat (final loss {r["warmup_loss"]:.4f}).  {task.WARMUP_NOTE}
2. The task, batch {args.batch}, fresh prompts every step, loss on the answer token only (other positions are
   not trained), until the held-out accuracy reaches {args.target} (checked every {args.eval_every} steps, at most {args.max_steps}).

AdamW (lr {args.lr}, weight decay 0.01) throughout, eager attention, `torch.use_deterministic_algorithms(True)`.

## Model

`LlamaForCausalLM`: {args.layers} layers, hidden {args.hidden}, {args.heads} heads ({args.kv_heads} key-value heads),
intermediate {args.intermediate}, vocabulary {len(task.vocabulary())}, untied embeddings, float32.

## Result

| | |
|---|---|
| parameters | {r["parameters"]:,} |
| steps | {args.warmup_steps} warm-up + {r["steps"]} task = {args.warmup_steps + r["steps"]} |
| final training loss | {r["final_loss"]:.4f} (answer cross-entropy, mean of the last 50 task steps) |
| held-out accuracy | {r["accuracy"]:.3f} on {HELD_OUT} prompts ({by_group}); argmax over the whole vocabulary |
| wall time | {r["wall_seconds"]:.1f} s ({args.threads} thread(s), {platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}) |
| files | {r["size"] / 1024:.0f} KiB |
| seed | {args.seed} (deterministic algorithms on) |
"""


if __name__ == "__main__":
    main()

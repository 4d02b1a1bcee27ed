"""Train the small OPT that ships with opt_fast (opt_fast/bundled/opt-tiny-py/), on CPU.

The corpus is Python's own standard library (`sysconfig.get_paths()["stdlib"]`): public text on
every Python install. A few modules are held out for validation. The script trains a byte-level
BPE tokenizer with OPT's special tokens, then a pre-LN OPT with transformers' `OPTForCausalLM`
(the reference implementation) on packed sequences that start with `</s>`, as OPT's tokenizer
prepends it, and writes a Hugging Face checkpoint in float16 that opt_fast and transformers load.

    python scripts/train_tiny.py                 # ~12 minutes on 2 idle cores; overwrites the bundled model
    python scripts/train_tiny.py --out /tmp/m    # anywhere else

Seeded: the same machine, thread count and Python version give the same model. The corpus is
whatever standard library the running Python has, so another version trains on other text.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from opt_fast.config import OPTConfig
from opt_fast.demo import train_tokenizer
from opt_fast.tokenizer import OPTTokenizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "opt_fast" / "bundled" / "opt-tiny-py"
# Held out of both the tokenizer's and the model's training; tests/test_bundled_model.py scores
# the model on textwrap.py.
VALIDATION_FILES = ("textwrap.py", "heapq.py", "fractions.py", "shlex.py", "queue.py")
# Test suites dwarf the library itself; encodings/ is mostly generated charmap tables and
# pydoc_data/ one large string of documentation: neither teaches Python.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data", "__pycache__"}
TOKENIZER_VOCAB = 8185   # + 7 padding rows = 8192 embedding rows, as OPT has 50265 + 7
SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, ffn_dim=1024,
             word_embed_proj_dim=256, max_position_embeddings=512)


def corpus_files() -> tuple[list[Path], list[Path]]:
    """(training files, validation files) of the running Python's standard library, sorted."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.rglob("*.py")
                   if not EXCLUDED_DIRS.intersection(p.relative_to(lib).parts[:-1]))
    validation = [lib / name for name in VALIDATION_FILES]
    missing = [str(p) for p in validation if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"validation files missing from the standard library: {missing}")
    return [p for p in files if p not in validation], validation


def read(files: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def packed_chunks(tokenizer: OPTTokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """[chunks, seq_len] token ids: every file's tokens after a `</s>`, concatenated, cut into
    pieces of seq_len - 1, each with `</s>` in front (the BOS that inference prepends)."""
    bos = tokenizer.bos_token_id
    stream = [t for text in texts for t in tokenizer.encode(text, add_special_tokens=True)]
    body = seq_len - 1
    n = len(stream) // body
    chunks = torch.tensor(stream[:n * body], dtype=torch.long).view(n, body)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), chunks], dim=1)


def build_model(config: OPTConfig, seed: int):
    import transformers
    torch.manual_seed(seed)
    hf_config = transformers.OPTConfig(**config.to_hf_dict(), dropout=0.0, attention_dropout=0.0,
                                       activation_dropout=0.0, layerdrop=0.0)
    return transformers.OPTForCausalLM(hf_config)


def optimizer_for(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Decay matrices only: biases, LayerNorm gains and the position table stay undecayed.
    decay, keep = [], []
    for name, param in model.named_parameters():
        (decay if param.dim() == 2 and "embed_positions" not in name else keep).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_factor(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `floor` times the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast(precision: str):
    # bfloat16 matmuls halve the step time on CPUs with AVX512-BF16 or AMX; weights and the
    # optimizer stay float32.
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def mean_loss(model, chunks: torch.Tensor, batch_size: int, precision: str) -> float:
    """Mean next-token cross-entropy (nats) over every position of every chunk."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start:start + batch_size]
        with autocast(precision):
            logits = model(input_ids=batch).logits.float()
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train()
    return total / count


def save_checkpoint(model, config: OPTConfig, tokenizer_dir: Path, out: Path) -> None:
    """config.json, float16 model.safetensors (`model.decoder.*`, the tied lm_head left out) and
    the tokenizer files, written to a scratch folder first so `out` is never half-replaced."""
    state = {k: v.detach().to(torch.float16).contiguous()
             for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    scratch = Path(tempfile.mkdtemp(prefix="opt-tiny-"))
    (scratch / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    save_file(state, str(scratch / "model.safetensors"), metadata={"format": "pt"})
    # safetensors writes its files owner-only; a package built from this tree must be readable by all.
    (scratch / "model.safetensors").chmod(0o644)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, scratch / name)
    out.mkdir(parents=True, exist_ok=True)
    for f in scratch.iterdir():
        shutil.move(str(f), out / f.name)
    scratch.rmdir()


def write_model_card(out: Path, facts: dict) -> None:
    f = facts
    text = f"""# opt-tiny-py

A {f['params_m']:.1f}M-parameter OPT trained for {f['minutes']:.0f} minutes on a 2-core CPU, on Python's standard-library sources.
It demonstrates opt_fast's machinery offline (`make run`, `opt-fast generate` without `--model`); it is not a capable model.
At low temperature it writes Python-shaped text (indentation, `def`, `self.`, `return`) that rarely means anything.

- Architecture: pre-LN OPT, hidden {f['hidden_size']}, {f['num_hidden_layers']} layers, {f['num_attention_heads']} heads (head_dim {f['head_dim']}), ffn {f['ffn_dim']}, {f['max_position_embeddings']} positions, ReLU, LM head tied to the embedding; weights in float16.
- Tokenizer: byte-level BPE trained on the same corpus, {f['tokenizer_vocab']} ids, OPT's special tokens at 0..3 (`<s>` `<pad>` `</s>` `<unk>`); `</s>` (2) is BOS and EOS. The embedding has {f['vocab_size']} rows (the tokenizer's size rounded up to a multiple of 8, as OPT's 50265 -> 50272).
- Corpus: {f['train_files']} `.py` files of the Python {f['python']} standard library, {f['train_tokens'] / 1e6:.1f}M tokens (test suites, `encodings/` and `pydoc_data/` left out). Validation, held out of tokenizer and model training: {', '.join(VALIDATION_FILES)} ({f['val_tokens'] / 1e3:.0f}k tokens).
- Training: transformers `OPTForCausalLM`; AdamW (peak lr {f['lr']}, betas 0.9/0.95, weight decay {f['weight_decay']} on matrices), {f['warmup']} warm-up steps then cosine decay to a tenth; {f['steps']} steps of {f['batch_size']} x {f['seq_len']} packed tokens, each sequence starting with `</s>` ({f['tokens_seen'] / 1e6:.1f}M tokens); {f['precision']} autocast; seed {f['seed']}; {f['threads']} threads; {f['minutes']:.1f} minutes wall-clock.
- Result: validation loss {f['val_loss']:.3f} nats/token (perplexity {math.exp(f['val_loss']):.1f}; a uniform guess scores ln {f['tokenizer_vocab']} = {math.log(f['tokenizer_vocab']):.2f}); training loss {f['train_loss']:.3f} over the last steps.

Reproduce with `{f['command']}` (seeded: the same Python version, machine and thread count give the same weights).
"""
    (out / "MODEL_CARD.md").write_text(text)


def sample(out: Path) -> None:
    """Continuations through opt_fast itself, with `make run`'s settings: the files load and generate."""
    from opt_fast import LLM, SamplingParams
    llm = LLM(str(out), kernels="torch", device="cpu")
    prompts = ["def read_config(path):", "class Stack:\n    def __init__(self):", "import os\n\n\ndef main():"]
    params = SamplingParams(temperature=0.3, top_p=0.9, repetition_penalty=1.1, max_tokens=48, seed=0)
    for result in llm.generate(prompts, params, use_tqdm=False):
        print(f"--- {result.prompt!r}\n{result.prompt}{result.outputs[0].text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model directory to write")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=SHAPE["max_position_embeddings"])
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="bf16 autocast (fast on CPUs with AVX512-BF16/AMX) or plain float32")
    parser.add_argument("--seed", type=int, default=0)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if not 2 <= args.seq_len <= SHAPE["max_position_embeddings"]:
        raise ValueError(f"--seq-len must be in 2..{SHAPE['max_position_embeddings']}, got {args.seq_len}")
    if args.steps < 1 or args.warmup < 1:
        raise ValueError(f"--steps and --warmup must be positive, got {args.steps} and {args.warmup}")
    torch.set_num_threads(args.threads)
    started = time.time()

    train_files, val_files = corpus_files()
    train_texts, val_texts = read(train_files), read(val_files)
    with tempfile.TemporaryDirectory(prefix="opt-tiny-tok-") as tok_dir:
        tok_dir = Path(tok_dir)
        train_tokenizer(tok_dir, vocab_size=TOKENIZER_VOCAB, texts=train_texts)
        tokenizer = OPTTokenizer.from_dir(tok_dir)
        vocab = tokenizer.vocab_size
        config = OPTConfig(vocab_size=vocab + (-vocab) % 8, **SHAPE)
        train = packed_chunks(tokenizer, train_texts, args.seq_len)
        val = packed_chunks(tokenizer, val_texts, args.seq_len)
        print(f"corpus: {len(train_files)} files, {train.numel() / 1e6:.2f}M training tokens "
              f"({sum(map(len, train_texts)) / 1e6:.1f}M chars); validation {len(val_files)} files, "
              f"{val.numel() / 1e3:.0f}k tokens; tokenizer {vocab} ids, embedding {config.vocab_size} rows "
              f"[{time.time() - started:.0f}s]", flush=True)

        model = build_model(config, args.seed)
        model.train()
        params = sum(p.numel() for p in model.model.parameters())
        print(f"model: {params / 1e6:.2f}M parameters, {args.steps} steps of "
              f"{args.batch_size} x {args.seq_len} tokens", flush=True)
        optimizer = optimizer_for(model, args.lr, args.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, args.steps, args.warmup))
        order = torch.Generator().manual_seed(args.seed)
        perm, cursor = torch.randperm(len(train), generator=order), 0
        window, train_loss, val_loss = [], float("nan"), float("nan")
        for step in range(args.steps):
            if cursor + args.batch_size > len(perm):     # next epoch, new order
                perm, cursor = torch.randperm(len(train), generator=order), 0
            batch = train[perm[cursor:cursor + args.batch_size]]
            cursor += args.batch_size
            with autocast(args.precision):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            window.append(loss.item())
            if (step + 1) % 25 == 0 or step + 1 == args.steps:
                train_loss = sum(window) / len(window)
                window.clear()
                print(f"step {step + 1:5d}  train loss {train_loss:.3f}  "
                      f"lr {schedule.get_last_lr()[0]:.2e}  [{time.time() - started:.0f}s]", flush=True)
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                val_loss = mean_loss(model, val, args.batch_size, args.precision)
                print(f"step {step + 1:5d}  validation loss {val_loss:.3f}  [{time.time() - started:.0f}s]",
                      flush=True)

        save_checkpoint(model, config, tok_dir, args.out)
    minutes = (time.time() - started) / 60
    write_model_card(args.out, dict(
        params_m=params / 1e6, minutes=minutes, **SHAPE, head_dim=config.head_dim,
        tokenizer_vocab=vocab, vocab_size=config.vocab_size, train_files=len(train_files),
        python=platform.python_version(), train_tokens=train.numel(), val_tokens=val.numel(),
        lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, tokens_seen=args.steps * args.batch_size * args.seq_len,
        precision=args.precision, seed=args.seed, threads=args.threads, val_loss=val_loss,
        train_loss=train_loss, command=shlex.join(["python", "scripts/train_tiny.py", *argv])))
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"wrote {args.out} ({size:.1f} MB) in {minutes:.1f} minutes; validation loss {val_loss:.3f}")
    sample(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

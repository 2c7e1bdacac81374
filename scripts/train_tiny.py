"""Train the small models the repo ships: a sentencepiece tokenizer and a Llama-architecture model (our
model.py) on the Python standard library's source files.

    python scripts/train_tiny.py --preset target --out models/stdlib-target --compile
    python scripts/train_tiny.py --preset draft --out models/stdlib-draft --compile \\
        --tokenizer_path models/stdlib-target/tokenizer.model \\
        --distill_from models/stdlib-target/model.pth     # the draft shares the target's tokenizer, learns its outputs

Data: the .py files of the standard library of the Python that runs this (or of --source_dir), less tests,
third-party packages and the data tables of encodings/ and pydoc_data/ (eval.stdlib_files). The split is
fixed by the file's path: eval.is_validation_file holds out each file whose relative path (e.g.
"json/decoder.py") has a CRC-32 of 0 mod 20, about 1 file in 20, for validation; the rest is for training,
tokenizer included. Each file is one document, bos + tokens + eos; training reads random windows of the
joined training documents.

Training: AdamW (weight decay on matrices only), linear warmup then cosine decay to a tenth, gradient
clipping at 1, float32. Deterministic for a seed on one device with one torch version. The output folder
gets model.pth (our checkpoint format, weights in --dtype), tokenizer.model and train_info.json (Python
version, seed, steps, final train and validation loss, timings).
"""
import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from eval import mean_nll, read_text, stdlib_split, token_stream  # noqa: E402
from generate import load_model, pick_device  # noqa: E402
from model import ModelArgs, Transformer, UserError, load_checkpoint, save_checkpoint  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

VOCAB_SIZE = 2048  # the presets' default; the model takes the tokenizer's actual size
SEQ_LEN = 256
# Llama-architecture shapes (GQA, SwiGLU, RoPE, tied embeddings to save space) and their training defaults.
PRESETS = {
    "target": dict(model=ModelArgs(vocab_size=VOCAB_SIZE, dim=256, n_layers=6, n_heads=8, n_kv_heads=4,
                                   intermediate_size=688, head_dim=32, max_seq_len=SEQ_LEN, tie_word_embeddings=True),
                   steps=2000, batch_size=8, lr=2e-3),
    # A third of the target's layers: speculative decoding wants a draft much cheaper per token.
    "draft": dict(model=ModelArgs(vocab_size=VOCAB_SIZE, dim=192, n_layers=2, n_heads=6, n_kv_heads=3,
                                  intermediate_size=512, head_dim=32, max_seq_len=SEQ_LEN, tie_word_embeddings=True),
                  steps=1000, batch_size=8, lr=2e-3),
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
TOKENIZER_MAX_LINES = 200_000  # plenty for a 2048-token BPE, and keeps its training to seconds


def train_sentencepiece(lines, path, vocab_size: int, **options) -> Path:
    """Train a Llama-2-style sentencepiece BPE model on `lines` into `path` (a .model file): byte fallback (any
    text encodes), identity normalization and kept whitespace (code's indentation survives), digits split,
    unk=0 bos=1 eos=2, no pad. `options` override the trainer's settings."""
    import sentencepiece as spm

    path = Path(path)
    settings = dict(model_type="bpe", vocab_size=vocab_size, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                    pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
                    allow_whitespace_only_pieces=True, split_digits=True, character_coverage=0.99, num_threads=1,
                    minloglevel=2)
    settings.update(options)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(path.with_suffix("")), **settings)
    model = path.with_suffix(".model")
    if model != path:
        model.replace(path)
    path.with_suffix(".vocab").unlink(missing_ok=True)
    return path


def corpus_lines(paths, max_lines: int) -> list:
    """Non-blank lines of the files, in order, up to max_lines (the tokenizer's training sentences)."""
    lines = []
    for path in paths:
        lines += [line for line in read_text(path).splitlines() if line.strip()]
        if len(lines) >= max_lines:
            break
    return lines[:max_lines]


def init_weights(model: Transformer, std: float = 0.02):
    """Small normal weights; the projections into the residual stream scaled by 1/sqrt(2 * n_layers) so its
    variance does not grow with depth (GPT-2, Radford et al. 2019)."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            nn.init.normal_(p, std=std / math.sqrt(2 * model.args.n_layers))
        elif p.dim() == 2:
            nn.init.normal_(p, std=std)
        else:
            nn.init.zeros_(p)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay from lr to lr / 10 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def random_windows(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple:
    """(inputs, targets) [B, seq_len] of batch_size windows starting at random offsets of stream [N]."""
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator, device=stream.device)
    rows = stream[starts[:, None] + torch.arange(seq_len + 1, device=stream.device)]
    return rows[:, :-1], rows[:, 1:]


def train(model: Transformer, stream: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int,
          seq_len: int = SEQ_LEN, weight_decay: float = 0.1, compile: bool = False, log_every: int = 50,
          on_log=None, teacher: Optional[Transformer] = None) -> list:
    """Train model in place on random windows of stream [N] (on the model's device); returns the losses.
    compile: run the training forward through torch.compile (one graph: every batch has the same shape).
    teacher: distill, i.e. fit the teacher's next-token distributions on the same windows (soft cross-entropy,
    whose gradient is that of the forward KL(teacher || model); Hinton et al. 2015, arXiv:1503.02531) instead of
    the data's next tokens. A draft distilled from its target agrees with it more often (DistillSpec, Zhou et al.
    2023, arXiv:2310.08461), and agreement is what speculative decoding's acceptance is."""
    generator = torch.Generator(stream.device).manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = max(1, min(200, steps // 10))
    forward = torch.compile(model) if compile else model
    teacher_forward = None if teacher is None else (torch.compile(teacher) if compile else teacher)
    losses = []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        x, y = random_windows(stream, batch_size, seq_len, generator)
        logits = forward(x)  # [B, S, vocab]: the whole window, no KV cache
        if teacher_forward is None:
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        else:
            with torch.no_grad():
                target_probs = teacher_forward(x).float().softmax(-1)  # [B, S, vocab]
            loss = -(target_probs * logits.float().log_softmax(-1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if on_log is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
            on_log(step + 1, losses)
    model.eval()
    return losses


@torch.no_grad()
def top1_agreement(model: Transformer, teacher: Transformer, stream: torch.Tensor, window: int = SEQ_LEN,
                   batch_size: int = 8) -> float:
    """Fraction of positions of stream's non-overlapping windows where model's and teacher's most likely next
    tokens are the same: the chance that greedy speculative decoding accepts a draft token (given its prefix)."""
    n_windows = (len(stream) - 1) // window
    inputs = stream[:n_windows * window].view(n_windows, window)
    same = 0
    for start in range(0, n_windows, batch_size):
        x = inputs[start:start + batch_size]
        same += (model(x).argmax(-1) == teacher(x).argmax(-1)).sum().item()
    return same / (n_windows * window)


def checkpoint_state_dict(model: Transformer, dtype: torch.dtype) -> dict:
    """The weights to save, in dtype; a tied output head is stored once, as the embedding (as conversion does)."""
    sd = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    if model.args.tie_word_embeddings:
        del sd["output.weight"]
    return sd


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def check_teacher(distill_from: Path, tokenizer_path: Optional[Path]):
    """Refuse, before any work, a teacher that is missing or does not share the student's tokenizer."""
    if not distill_from.is_file():
        raise UserError(f"--distill_from {distill_from} not found; pass the target's model.pth")
    if tokenizer_path is None:
        raise UserError("--distill_from needs --tokenizer_path: the student must use the teacher's tokenizer")
    teacher_args = ModelArgs.from_dict(load_checkpoint(distill_from)["model_args"])
    if teacher_args.max_seq_len < SEQ_LEN:
        raise UserError(f"--distill_from {distill_from} has a context of {teacher_args.max_seq_len} tokens, fewer "
                        f"than the {SEQ_LEN}-token training windows; pass a teacher with a longer context")
    teacher_vocab, vocab = teacher_args.vocab_size, load_tokenizer(tokenizer_path).vocab_size
    if teacher_vocab != vocab:
        raise UserError(f"--distill_from {distill_from} has a vocabulary of {teacher_vocab} tokens, the tokenizer "
                        f"{tokenizer_path} {vocab}; pass the teacher's own tokenizer with --tokenizer_path")


def main(preset: str, out: Path, steps: Optional[int], batch_size: Optional[int], lr: Optional[float], seed: int,
         device: Optional[str], dtype: str, tokenizer_path: Optional[Path], vocab_size: int,
         source_dir: Optional[Path], eval_windows: int, compile: bool, force: bool,
         distill_from: Optional[Path] = None):
    tok_out = out / "tokenizer.model"
    reuse_tokenizer = tokenizer_path is not None and tokenizer_path.resolve() == tok_out.resolve()
    written = [out / "model.pth", out / "train_info.json"] + ([] if reuse_tokenizer else [tok_out])
    existing = [str(p) for p in written if p.exists()]
    if existing and not force:
        raise UserError(f"{', '.join(existing)} exist{'s' if len(existing) == 1 else ''}; pass --force to overwrite")
    if tokenizer_path is not None and not tokenizer_path.is_file():
        raise UserError(f"tokenizer {tokenizer_path} not found")
    if distill_from is not None:
        check_teacher(distill_from, tokenizer_path)
    cfg = PRESETS[preset]
    steps, batch_size, lr = steps or cfg["steps"], batch_size or cfg["batch_size"], lr or cfg["lr"]
    device = pick_device(device, None)[0]
    if device.type == "cuda":  # the same seed gives the same model there too (cuBLAS needs this set first)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    t_start = time.perf_counter()
    train_files, val_files = stdlib_split(source_dir)
    if not train_files or not val_files:
        raise UserError(f"found {len(train_files)} training and {len(val_files)} validation files under "
                        f"{source_dir or 'the standard library'}; need .py files on both sides of the split")
    log(f"{len(train_files)} training files, {len(val_files)} validation files")

    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_path is None:
        lines = corpus_lines(train_files, TOKENIZER_MAX_LINES)
        # trained beside its destination, then renamed: an interrupted run leaves no half-written tokenizer
        train_sentencepiece(lines, out / "tokenizer.model.tmp", vocab_size).replace(tok_out)
    elif not reuse_tokenizer:
        shutil.copyfile(tokenizer_path, tok_out)
    tokenizer = load_tokenizer(tok_out)
    args = replace(cfg["model"], vocab_size=tokenizer.vocab_size)

    t0 = time.perf_counter()
    train_stream = token_stream(tokenizer, train_files).to(device)
    val_stream = token_stream(tokenizer, val_files).to(device)
    log(f"tokenized: {len(train_stream)} training and {len(val_stream)} validation tokens "
        f"in {time.perf_counter() - t0:.1f} s")

    teacher = None
    if distill_from is not None:
        teacher = load_model(distill_from, device, torch.float32, decode_kernels=False).eval()
        log(f"distilling from {distill_from}")

    torch.manual_seed(seed)
    model = Transformer(args).to(device)
    init_weights(model)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{preset}: {n_params / 1e6:.2f}M parameters; {steps} steps of {batch_size} x {SEQ_LEN} tokens on {device}")

    t_train = time.perf_counter()

    def on_log(step, losses):
        recent = sum(losses[-50:]) / len(losses[-50:])
        val, _ = mean_nll(model, val_stream, SEQ_LEN, batch_size, max_windows=eval_windows)
        log(f"step {step}/{steps}: train loss {recent:.4f}, val loss {val:.4f} ({eval_windows} windows), "
            f"{time.perf_counter() - t_train:.0f} s")

    losses = train(model, train_stream, steps, batch_size, lr, seed, compile=compile, on_log=on_log,
                   log_every=max(1, steps // 20), teacher=teacher)
    train_s = time.perf_counter() - t_train
    val_loss, val_tokens = mean_nll(model, val_stream, SEQ_LEN, batch_size)
    log(f"validation loss {val_loss:.4f} (perplexity {math.exp(val_loss):.3f}) over {val_tokens} tokens")
    distilled = {}
    if teacher is not None:
        agreement = top1_agreement(model, teacher, val_stream)
        log(f"top-1 agreement with the teacher on validation: {agreement:.4f}")
        distilled = {"distilled_from": str(distill_from), "validation_top1_agreement": round(agreement, 4)}

    save_checkpoint(out / "model.pth", checkpoint_state_dict(model, DTYPES[dtype]), args,
                    tokenizer={"bos_id": tokenizer.bos_id, "eos_ids": [tokenizer.eos_id], "special_tokens": {},
                               "chat_format": None, "add_bos": True}, force=force)
    info = {"preset": preset, "parameters": n_params, "model_args": args.to_dict(), "python": platform.python_version(),
            "torch": torch.__version__, "device": str(device), "seed": seed, "steps": steps, "batch_size": batch_size,
            "seq_len": SEQ_LEN, "lr": lr, "compile": compile, "dtype": dtype, "train_files": len(train_files),
            "validation_files": len(val_files), "train_tokens": len(train_stream), "validation_tokens": len(val_stream),
            "final_train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
            "validation_loss": round(val_loss, 4), "validation_perplexity": round(math.exp(val_loss), 3),
            **distilled, "train_seconds": round(train_s, 1), "total_seconds": round(time.perf_counter() - t_start, 1),
            "command": "python scripts/train_tiny.py " + " ".join(sys.argv[1:])}
    tmp = out / "train_info.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(out / "train_info.json")
    log(f"wrote {out / 'model.pth'}, {tok_out.name} and train_info.json in {info['total_seconds']:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="target")
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. models/stdlib-target")
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batch_size", type=int, default=None, help=f"windows of {SEQ_LEN} tokens per step "
                        "(default: the preset's)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="of the saved weights")
    parser.add_argument("--tokenizer_path", type=Path, default=None,
                        help="reuse this sentencepiece model instead of training one (a draft shares its target's)")
    parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE, help="of a tokenizer trained here")
    parser.add_argument("--source_dir", type=Path, default=None,
                        help="a standard library folder to read (default: this Python's)")
    parser.add_argument("--eval_windows", type=int, default=16, help="validation windows scored at each log line")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step's forward "
                        "(about 30 s to compile; faster steps after)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing model.pth")
    parser.add_argument("--distill_from", type=Path, default=None,
                        help="a model.pth to distill (a draft from its target): fit its next-token distributions "
                        "instead of the data's tokens; needs the same tokenizer (--tokenizer_path)")
    try:
        main(**vars(parser.parse_args()))
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")

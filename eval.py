"""Perplexity of a checkpoint (float or quantized) on held-out text files.

    python eval.py                                                   # shipped target, stdlib validation files
    python eval.py --checkpoint_path models/stdlib-target/model_int8.pth --files a.py b.py --window 256

Each file becomes one document as the shipped models were trained on them: bos, the file's tokens, eos (each
where the tokenizer has one); the documents are joined in the order given. The joined stream is cut into
non-overlapping windows of `window` inputs, each predicting the next `window` tokens: window i reads tokens
[i*W, (i+1)*W) and scores tokens [i*W+1, (i+1)*W], so every token after the first is scored once, with the
context of its own window only. Tokens past the last whole window are not scored. Perplexity is
exp(mean negative log-likelihood per scored token).

Without --files: the validation files of the standard-library split the shipped models were trained on
(`stdlib_split`, below), taken from the Python that runs this.
"""
import argparse
import math
import sys
import sysconfig
import zlib
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from model import UserError, load_checkpoint

# Directories left out of the corpus: tests and third-party packages are not the standard library's own
# code, and encodings/ and pydoc_data/ are mostly data tables and prose.
STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                                 "encodings", "pydoc_data"})
VALIDATION_BUCKETS = 20  # a file is held out when crc32(its relative path) % 20 == 0: about 1 file in 20


class TextTooShortError(UserError):
    pass


def stdlib_files(root: Optional[Path] = None) -> list:
    """The standard library's .py files (under root, default this Python's), as sorted relative paths."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = (p.relative_to(root) for p in root.rglob("*.py") if p.is_file())
    return sorted(p for p in files if not STDLIB_SKIPPED_DIRS.intersection(p.parts[:-1]))


def is_validation_file(relative_path: Path) -> bool:
    """The fixed split: decided by a stable hash of the path alone (not Python's salted hash()), so a file
    stays on its side whatever else the library holds."""
    return zlib.crc32(Path(relative_path).as_posix().encode()) % VALIDATION_BUCKETS == 0


def stdlib_split(root: Optional[Path] = None) -> tuple:
    """(train, validation) lists of absolute paths of the standard library's .py files."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    return ([root / p for p in files if not is_validation_file(p)], [root / p for p in files if is_validation_file(p)])


def read_text(path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def document_ids(tokenizer, text: str) -> list:
    """A file's token ids as one training document: bos, the text, eos (each where the tokenizer has one)."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if getattr(tokenizer, "eos_id", None) is not None else []
    return bos + tokenizer.encode(text) + eos


def token_stream(tokenizer, paths) -> Tensor:
    """The files' documents joined in order: one long [N] tensor of token ids."""
    ids = []
    for path in paths:
        ids += document_ids(tokenizer, read_text(path))
    return torch.tensor(ids, dtype=torch.long)


def count_windows(n_tokens: int, window: int) -> int:
    """Whole windows of `window` inputs a stream of n_tokens holds; refused if not even one."""
    if n_tokens < window + 1:
        raise TextTooShortError(f"the text has {n_tokens} tokens; a window of {window} needs at least "
                                f"{window + 1} (pass a smaller --window or more text)")
    return (n_tokens - 1) // window


@torch.no_grad()
def mean_nll(model, ids: Tensor, window: int, batch_size: int = 8, max_windows: Optional[int] = None,
             on_batch: Optional[Callable] = None) -> tuple:
    """(mean negative log-likelihood in nats per scored token, tokens scored) of model on the stream ids [N],
    over non-overlapping windows of `window` inputs (see the module docstring). on_batch(done, total) after
    each batch of windows."""
    n_windows = count_windows(len(ids), window)
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    device = model.tok_embeddings.weight.device
    inputs = ids[:n_windows * window].view(n_windows, window)
    targets = ids[1:n_windows * window + 1].view(n_windows, window)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, n_windows, batch_size):
        x = inputs[start:start + batch_size].to(device)
        y = targets[start:start + batch_size].to(device)
        logits = model(x)  # [b, W, vocab] float32, the whole window at once without the KV cache
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").double()
        if on_batch is not None:
            on_batch(min(start + batch_size, n_windows), n_windows)
    n_tokens = n_windows * window
    return total.item() / n_tokens, n_tokens


class Progress:
    """`eval: 12/40 windows` on stderr, rewritten in place on a terminal, every tenth of the way elsewhere."""

    def __init__(self, out=sys.stderr):
        self.out, self.shown = out, -1

    def __call__(self, done: int, total: int):
        if self.out.isatty():
            self.out.write(f"\reval: {done}/{total} windows" + ("\n" if done == total else ""))
        elif done * 10 // total > self.shown:
            self.shown = done * 10 // total
            self.out.write(f"eval: {done}/{total} windows\n")
        self.out.flush()


def main(checkpoint_path: Path, files: Optional[list], window: int, batch_size: int, max_windows: Optional[int],
         device: Optional[str], precision: Optional[str], tokenizer_path: Optional[Path]):
    from generate import checkpoint_tokenizer, load_model, log, pick_device

    device, precision = pick_device(device, precision)
    ckpt = load_checkpoint(checkpoint_path)
    context = ckpt["model_args"]["max_seq_len"]
    if window > context:
        raise UserError(f"--window {window} is longer than the model's context of {context}")
    tokenizer = checkpoint_tokenizer(checkpoint_path, ckpt, tokenizer_path)
    if not files:
        files = stdlib_split()[1]
        if not files:
            raise UserError(f"no .py sources under {sysconfig.get_paths()['stdlib']} to take the validation files "
                            "from; pass --files")
    ids = token_stream(tokenizer, files)
    count_windows(len(ids), window)  # before the weights load: too little text fails fast
    scheme = (ckpt.get("quantization") or {}).get("scheme", "float")
    model = load_model(checkpoint_path, device, precision, checkpoint=ckpt)
    del ckpt
    log(f"{checkpoint_path} ({scheme}, {str(precision).removeprefix('torch.')} on {device}): {len(files)} files, "
        f"{len(ids)} tokens")
    nll, n_tokens = mean_nll(model, ids, window, batch_size, max_windows, on_batch=Progress())
    print(f"perplexity {math.exp(nll):.4f}  (mean NLL {nll:.4f} nats/token over {n_tokens} tokens, "
          f"{n_tokens // window} windows of {window})")


def build_parser() -> argparse.ArgumentParser:
    from generate import DEFAULT_CHECKPOINT, DTYPES

    p = argparse.ArgumentParser(description="Perplexity of a checkpoint on held-out text files.")
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help="any model.pth, float or quantized (default: the shipped models/stdlib-target)")
    p.add_argument("--files", type=Path, nargs="+", default=None,
                   help="text files to score (default: the validation files of the standard-library split)")
    p.add_argument("--window", type=int, default=256, help="tokens of context per window (non-overlapping)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--max_windows", type=int, default=None, help="score only the first this many windows")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precision", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--tokenizer_path", type=Path, default=None, help="default: tokenizer.model beside the checkpoint")
    return p


if __name__ == "__main__":
    from tokenizer import TokenizerError

    parser = build_parser()
    cli_args = parser.parse_args()
    if min(cli_args.window, cli_args.batch_size, 1 if cli_args.max_windows is None else cli_args.max_windows) < 1:
        parser.error("--window, --batch_size and --max_windows must be at least 1")
    try:
        main(**vars(cli_args))
    except (UserError, TokenizerError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)

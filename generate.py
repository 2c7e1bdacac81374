"""Generate text with a Llama-family checkpoint: loading, sampling, the compiled decode loop, the CLI, metrics.

    python generate.py --compile --checkpoint_path checkpoints/meta-llama/Llama-2-7b-hf/model.pth --prompt "Hi"
"""
import argparse
import contextlib
import resource
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from model import CheckpointError, ModelArgs, Transformer, UserError, load_checkpoint
from decode_kernels import fuse_decode
from quantize import swap_linears
from tokenizer import TokenizerError, load_tokenizer
from tp import (apply_tp, check_tp, env_world, init_distributed, rank0_output, shard_or_whole,
                shutdown_distributed, use_symmetric_memory)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The small model trained on the Python standard library that the repo ships (scripts/train_tiny.py).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "models" / "stdlib-target" / "model.pth"


# ----------------------------------------------------------------------------------------------- loading

def load_model(checkpoint_path, device, precision=torch.bfloat16, checkpoint: Optional[dict] = None,
               rank: int = 0, world_size: int = 1, vocab_parallel_output: bool = True,
               decode_kernels: bool = True) -> Transformer:
    """Build the model on the meta device and assign the memory-mapped weights, then move to device/dtype.
    `checkpoint`: the already-opened load_checkpoint(checkpoint_path), to avoid opening it twice.
    world_size > 1: only this rank's tensor-parallel shard is read and kept (tp.apply_tp; the process group must
    be initialised, tp.init_distributed).
    decode_kernels: on CUDA, the one-token step runs decode_kernels.py's decode layer (fuse_decode)."""
    ckpt = checkpoint if checkpoint is not None else load_checkpoint(checkpoint_path)
    args = ModelArgs.from_dict(ckpt["model_args"])
    with torch.device("meta"):
        model = Transformer(args)
    if ckpt.get("quantization"):  # the scheme comes from the checkpoint, never from its name
        swap_linears(model, ckpt["quantization"])
    if world_size > 1:
        apply_tp(model, rank, world_size, vocab_parallel_output)
    try:
        model.load_state_dict(ckpt["state_dict"], assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint_path}: weights do not match its config "
                              f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    model = model.to(device=device, dtype=precision).eval()
    if world_size > 1:
        use_symmetric_memory(model)  # one-shot decode all-reduces on CUDA (tp.all_reduce); NCCL/gloo otherwise
    return fuse_decode(model) if decode_kernels else model


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer except the embedding table,
    of which a step reads only B rows (unless it is tied to the output head, which reads all of it)."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.data_ptr() in seen or name in ("rope", "causal_mask") or "kv_cache" in name:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    if not model.args.tie_word_embeddings:
        emb = model.tok_embeddings.weight
        total -= emb.numel() * emb.element_size()
    return total


def kv_cache_bytes(model: Transformer, batch_size: int) -> int:
    """Bytes of KV cache one decode step reads: attention reads the whole static cache under its mask."""
    return sum(b.numel() * b.element_size() * batch_size // max(model.max_batch_size, 1)
               for name, b in model.named_buffers() if "kv_cache" in name)


# ---------------------------------------------------------------------------------------------- sampling

def logits_to_probs(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                    top_p: Optional[float] = None) -> Tensor:
    """Softmax of logits [..., V] / temperature, restricted to the top_k tokens and the top_p nucleus."""
    logits = logits / max(temperature, 1e-5)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (Holtzman et al. 2019,
        # arXiv:1904.09751): a token stays if the mass before it is still under top_p.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None) -> Tensor:
    """Draw a token per row from logits [B, V] -> [B, 1]; temperature 0 is exact argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return draw(logits_to_probs(logits, temperature, top_k, top_p))


def draw(probs: Tensor) -> Tensor:
    """One token per row of probs [B, V] (unnormalised is fine) -> [B, 1]."""
    # argmax(p / E) with E ~ Exp(1) picks token i with probability p_i / sum(p) (the exponential race),
    # without the host sync torch.multinomial needs.
    race = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / race, dim=-1, keepdim=True)


# Two functions with the same body on purpose: torch.compile caches per code object, and the prefill
# (dynamic prompt length) and the decode step (one token, CUDA graphs) are compiled differently.
def prefill(model: Transformer, tokens: Tensor, input_pos: Tensor, **sampling) -> Tensor:
    # tokens: [B, T], input_pos: [T] -> next token [B, 1]
    return sample(model(tokens, input_pos)[:, -1], **sampling)


def decode_one_token(model: Transformer, token: Tensor, input_pos: Tensor, **sampling) -> Tensor:
    # token: [B, 1], input_pos: [1] -> next token [B, 1]
    return sample(model(token, input_pos)[:, -1], **sampling)


# ------------------------------------------------------------------------------------------- decode loop

class TokenStream:
    """Brings each step's tokens to the host a few steps behind the device, so the device never waits on
    Python; the host sees every token in order, records each row up to its first stop token and calls
    `on_token(list_of_B_ids)` per step."""

    def __init__(self, batch_size: int, stop_ids, on_token: Optional[Callable], device, lag: int = 4):
        self.rows = [[] for _ in range(batch_size)]
        self.stopped = [False] * batch_size
        self.stop_ids, self.on_token, self.lag = set(stop_ids), on_token, lag
        self.asynchronous = torch.device(device).type == "cuda"
        self.pending = deque()

    def push(self, tokens: Tensor):
        if not self.asynchronous:
            return self._consume(tokens.cpu())
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((host, event))
        while self.pending and (len(self.pending) > self.lag or self.pending[0][1].query()):
            self._pop()

    def _pop(self):
        host, event = self.pending.popleft()
        event.synchronize()
        self._consume(host)

    def flush(self):
        while self.pending:
            self._pop()

    def _consume(self, host: Tensor):
        step = host.view(-1).tolist()
        for row, (t, done) in enumerate(zip(step, self.stopped)):
            if not done:
                self.rows[row].append(t)
                self.stopped[row] = t in self.stop_ids
        if self.on_token is not None:
            self.on_token(step)

    @property
    def done(self) -> bool:
        return all(self.stopped)


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, stop_ids=(),
             on_token: Optional[Callable] = None, prefill_fn=prefill, decode_fn=decode_one_token,
             timings: Optional[dict] = None) -> list:
    """Generate up to max_new_tokens after prompt [T] or [B, T] (token ids on the model's device).

    Returns one list of new token ids per row, each ending at its first stop token when one came.
    The caches must already hold prompt + max_new_tokens positions (model.setup_caches).
    """
    prompt = prompt.view(1, -1) if prompt.dim() == 1 else prompt
    batch, length = prompt.shape
    device = prompt.device
    if length + max_new_tokens > model.max_seq_length or batch > model.max_batch_size:
        raise UserError(f"prompt ({length}) + max_new_tokens ({max_new_tokens}) at batch {batch} does not fit "
                        f"the caches ({model.max_seq_length} x {model.max_batch_size}); call setup_caches")
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    stream = TokenStream(batch, stop_ids, on_token, device)
    t0 = time.perf_counter()
    token = prefill_fn(model, prompt, torch.arange(length, device=device), **sampling)
    stream.push(token)
    _sync(device)
    t1 = time.perf_counter()
    input_pos = torch.tensor([length], device=device, dtype=torch.long)
    steps = 1
    while steps < max_new_tokens and not stream.done:
        # clone: under CUDA graphs the step's output buffer is overwritten by the next replay
        token = decode_fn(model, token.clone(), input_pos, **sampling)
        input_pos += 1
        stream.push(token)
        steps += 1
    stream.flush()
    _sync(device)
    if timings is not None:
        timings.update(prefill_s=t1 - t0, decode_s=time.perf_counter() - t1, decode_steps=steps - 1)
    return stream.rows


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def compile_step(fn: Callable, device) -> Callable:
    """torch.compile a step whose shapes never change: one graph, and on GPU one CUDA graph replayed for
    every call (mode reduce-overhead)."""
    import torch._inductor.config as inductor_config

    inductor_config.coordinate_descent_tuning = True
    inductor_config.triton.unique_kernel_names = True
    inductor_config.fx_graph_cache = True
    cuda = torch.device(device).type == "cuda"
    return torch.compile(fn, mode="reduce-overhead" if cuda else None, fullgraph=True)


def compile_fns(device, compile_prefill: bool = False):
    """torch.compile the decode step (CUDA graphs on GPU, one graph for every step and sample) and,
    optionally, the prefill (dynamic prompt length). Returns (prefill_fn, decode_fn)."""
    decode = compile_step(decode_one_token, device)
    prefill_fn = torch.compile(prefill, fullgraph=True, dynamic=True) if compile_prefill else prefill
    return prefill_fn, decode


# --------------------------------------------------------------------------------------------------- CLI

CHAT_FORMATS = ("llama3", "chatml", "llama2")


def encode_chat(tokenizer, chat_format: Optional[str], turns: list) -> list:
    """Token ids for a conversation [(role, text), ...] ending with the assistant's turn to speak."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    if chat_format == "llama3":
        text = "".join(f"<|start_header_id|>{r}<|end_header_id|>\n\n{t}<|eot_id|>" for r, t in turns)
        return bos + tokenizer.encode(text + "<|start_header_id|>assistant<|end_header_id|>\n\n")
    if chat_format == "chatml":
        text = "".join(f"<|im_start|>{r}\n{t}<|im_end|>\n" for r, t in turns)
        return tokenizer.encode(text + "<|im_start|>assistant\n")
    if chat_format == "llama2":
        ids = []
        for r, t in turns:
            if r == "user":
                ids += bos + tokenizer.encode(f"[INST] {t} [/INST]")
            else:
                ids += tokenizer.encode(f" {t} ") + [tokenizer.eos_id]
        return ids
    return bos + tokenizer.encode("".join(t for _, t in turns))  # a base model: plain continuation


class TextPrinter:
    """Streams row 0's text as tokens arrive, holding back an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer, stop_ids, out=None):
        # sys.stdout looked up now, not at import: under torchrun, ranks other than 0 replace it
        self.tokenizer, self.stop_ids, self.out = tokenizer, set(stop_ids), out or sys.stdout
        self.ids, self.printed, self.stopped = [], 0, False

    def __call__(self, step_tokens):
        t = step_tokens[0]
        if self.stopped or t in self.stop_ids:
            self.stopped = True
            return
        self.ids.append(t)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


def peak_memory_gb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def find_tokenizer(checkpoint_path: Path) -> Path:
    for candidate in (checkpoint_path.parent / "tokenizer.model", checkpoint_path.parent / "original" / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise TokenizerError(f"no tokenizer.model beside {checkpoint_path}; pass --tokenizer_path")


def checkpoint_tokenizer(checkpoint_path: Path, ckpt: dict, tokenizer_path: Optional[Path] = None):
    """The checkpoint's tokenizer (beside it, or tokenizer_path), with the bos/eos/special-token facts that
    conversion recorded in `ckpt` (its load_checkpoint dict); refused if it has more tokens than the model."""
    facts = ckpt.get("tokenizer") or {}
    tokenizer = load_tokenizer(tokenizer_path or find_tokenizer(Path(checkpoint_path)), facts.get("special_tokens"),
                               facts.get("bos_id"), facts.get("eos_ids"), facts.get("pattern"))
    if not facts.get("add_bos", True):
        tokenizer.bos_id = None
    vocab_size = ckpt["model_args"]["vocab_size"]
    if tokenizer.vocab_size > vocab_size:
        raise TokenizerError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{vocab_size}; is it the checkpoint's own tokenizer?")
    return tokenizer


def pick_device(device: Optional[str], precision: Optional[str]) -> tuple:
    """(torch.device, dtype) from the CLI's --device and --precision, either of which may be None."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # bfloat16 halves the bytes each step reads on a GPU; CPUs without bf16 matrix units run it far slower.
    return device, DTYPES[precision or ("bfloat16" if device.type == "cuda" else "float32")]


def main(checkpoint_path: Path, prompt: str, max_new_tokens: int, num_samples: int, temperature: float,
         top_k: Optional[int], top_p: Optional[float], batch_size: int, interactive: bool, compile: bool,
         compile_prefill: bool, device: Optional[str], precision: Optional[str], profile: Optional[Path],
         tokenizer_path: Optional[Path], seed: int, draft_checkpoint_path: Optional[Path], speculate_k: int):
    device, precision = pick_device(device, precision)
    _, world_size, _ = env_world()  # launched by torchrun: tensor parallel over world_size processes
    if world_size > 1 and interactive:
        raise UserError("--interactive does not run under torchrun (one terminal, several processes)")
    torch.manual_seed(seed)  # the same seed on every rank: all ranks draw the same tokens
    ckpt = load_checkpoint(checkpoint_path)  # validates cheaply (mmap) before the tokenizer and the weights
    facts = ckpt.get("tokenizer") or {}
    tokenizer_path = tokenizer_path or find_tokenizer(checkpoint_path)
    tokenizer = checkpoint_tokenizer(checkpoint_path, ckpt, tokenizer_path)
    args = ModelArgs.from_dict(ckpt["model_args"])
    check_tp(args, world_size, ckpt.get("quantization"))  # before any weight is read or any process is joined
    draft_ckpt = None
    if draft_checkpoint_path is not None:
        if batch_size > 1 or interactive:
            raise UserError("--draft_checkpoint_path (speculative decoding) needs --batch_size 1 and no --interactive")
        import speculative  # here, not at the top: speculative.py imports this module

        draft_ckpt = speculative.check_draft_checkpoint(draft_checkpoint_path, ckpt, tokenizer_path)  # no weights read
    if interactive:
        cache_len = min(args.max_seq_len, 4096)  # room for a conversation, bounded for small GPUs
        ids = None
    elif prompt.isdigit():  # a synthetic prompt of that many tokens, for benchmarking
        ids = torch.randint(0, tokenizer.vocab_size, (int(prompt),)).tolist()
    else:
        ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)
    if ids is not None:
        cache_len = len(ids) + max_new_tokens
        if cache_len > args.max_seq_len:
            raise UserError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) = {cache_len} "
                            f"exceeds the model's context of {args.max_seq_len}; shorten one of them")
        if draft_ckpt is not None:  # room for the drafts scored past the last token (never emitted)
            cache_len += speculate_k

    rank, world_size, device = init_distributed(device)
    t0 = time.perf_counter()
    model = load_model(checkpoint_path, device, precision, checkpoint=ckpt, rank=rank, world_size=world_size)
    del ckpt
    _sync(device)
    log(f"loaded {checkpoint_path} in {time.perf_counter() - t0:.1f} s"
        + (f", tensor parallel over {world_size} ranks (this is rank 0 of them; the others print nothing)"
           if world_size > 1 else ""))
    model.setup_caches(batch_size, cache_len)
    prefill_fn, decode_fn = compile_fns(device, compile_prefill) if compile else (prefill, decode_one_token)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=tokenizer.stop_ids,
                    prefill_fn=prefill_fn)
    if interactive:
        return chat(model, tokenizer, facts.get("chat_format"), max_new_tokens, device, decode_fn=decode_fn,
                    **sampling)

    prompt_ids = torch.tensor(ids, device=device, dtype=torch.long).repeat(batch_size, 1)
    if draft_ckpt is None:
        def run(**kw):  # -> (rows, None)
            return generate(model, prompt_ids, max_new_tokens, decode_fn=decode_fn, **sampling, **kw), None
    else:
        t0 = time.perf_counter()
        # sharded like the target where its heads allow, else a whole copy on every rank
        draft_rank, draft_world = shard_or_whole(ModelArgs.from_dict(draft_ckpt["model_args"]), rank, world_size,
                                                 draft_ckpt.get("quantization"))
        draft = load_model(draft_checkpoint_path, device, precision, checkpoint=draft_ckpt, rank=draft_rank,
                           world_size=draft_world)
        del draft_ckpt
        draft.setup_caches(batch_size, cache_len)
        _sync(device)
        log(f"loaded draft {draft_checkpoint_path} in {time.perf_counter() - t0:.1f} s"
            + ("" if world_size == 1 else ", sharded" if draft_world > 1 else ", replicated on every rank"))
        round_fn = speculative.compile_speculative_round(device) if compile else speculative.speculative_round

        def run(**kw):  # -> (rows, acceptance stats)
            return speculative.speculative_generate(model, draft, prompt_ids, max_new_tokens, speculate_k=speculate_k,
                                                    round_fn=round_fn, **sampling, **kw)
    if compile:  # the first call compiles (and captures CUDA graphs); keep it out of the numbers
        t0 = time.perf_counter()
        run()
        log(f"compiled in {time.perf_counter() - t0:.1f} s")
    weight_bytes = weight_bytes_per_token(model)  # under tensor parallelism: this rank's shard
    step_bytes = weight_bytes + kv_cache_bytes(model, batch_size)
    gb_s = "GB/s" if world_size == 1 else "GB/s per rank"
    results, all_stats = [], []
    for i in range(num_samples):
        timings = {}
        printer = TextPrinter(tokenizer, tokenizer.stop_ids)
        if not prompt.isdigit():
            sys.stdout.write(prompt)
        profiling = profile is not None and i == num_samples - 1
        with (torch.profiler.profile() if profiling else contextlib.nullcontext()) as prof:
            rows, stats = run(on_token=printer, timings=timings)
        if profiling:
            prof.export_chrome_trace(str(profile))
            log(f"wrote profiler trace {profile}")
        sys.stdout.write("\n")
        n_tokens = sum(len(r) for r in rows)
        steps_per_s = timings["decode_steps"] / timings["decode_s"] if timings["decode_steps"] else float("nan")
        results.append(dict(ttft_s=timings["prefill_s"], tok_s=n_tokens / (timings["prefill_s"] + timings["decode_s"]),
                            decode_tok_s=steps_per_s * batch_size, gb_s=steps_per_s * step_bytes / 1e9))
        r = results[-1]
        line = (f"sample {i + 1}: {n_tokens} tokens, time to first token {r['ttft_s'] * 1e3:.1f} ms, "
                f"{r['tok_s']:.2f} tok/s overall, {r['decode_tok_s']:.2f} tok/s decode")
        if stats is None:
            log(f"{line}, {r['gb_s']:.1f} {gb_s}")
        else:  # a step reads the draft k times and the target once: no one number of bytes per token
            all_stats.append(stats)
            log(f"{line}; {speculative.format_stats(stats)}")
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    summary = (f"median of {num_samples}: time to first token {med['ttft_s'] * 1e3:.1f} ms, decode "
               f"{med['decode_tok_s']:.2f} tok/s")
    if not all_stats:
        per_rank = " per rank" if world_size > 1 else ""
        log(f"{summary}, {med['gb_s']:.1f} {gb_s} (weights {weight_bytes / 1e9:.2f} GB{per_rank}), "
            f"peak memory {peak_memory_gb(device):.2f} GB{' on rank 0' if world_size > 1 else ''}")
    else:
        total = speculative.acceptance_stats([sum(c) for c in zip(*(s["accepted_counts"] for s in all_stats))])
        log(f"{summary}, peak memory {peak_memory_gb(device):.2f} GB; all samples: {speculative.format_stats(total)}")


def chat(model, tokenizer, chat_format, max_new_tokens, device, **sampling):
    """A read-generate loop that keeps the conversation, formatted with the checkpoint's chat format."""
    turns = []
    while True:
        try:
            user = input("\n> ")
        except EOFError:
            return
        turns.append(("user", user))
        ids = encode_chat(tokenizer, chat_format, turns)
        if len(ids) + max_new_tokens > model.max_seq_length:
            log("the conversation is longer than the context; starting a new one")
            turns = [("user", user)]
            ids = encode_chat(tokenizer, chat_format, turns)[-(model.max_seq_length - max_new_tokens):]
        printer = TextPrinter(tokenizer, tokenizer.stop_ids)
        rows = generate(model, torch.tensor(ids, device=device), max_new_tokens, on_token=printer, **sampling)
        turns.append(("assistant", tokenizer.decode([t for t in rows[0] if t not in tokenizer.stop_ids])))


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate text with a Llama-family checkpoint.")
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help="model.pth from scripts/convert_hf_checkpoint.py (default: the shipped models/stdlib-target)")
    p.add_argument("--prompt", default="def fib(n):", help="text, or an integer N for a synthetic N-token prompt")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--num_samples", type=int, default=5)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy (exact argmax)")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--batch_size", type=int, default=1, help="the prompt repeated this many times")
    p.add_argument("--interactive", action="store_true", help="chat using the model's chat format")
    p.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on GPU)")
    p.add_argument("--compile_prefill", action="store_true", help="compile the prefill too")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precision", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--profile", type=Path, default=None, help="write a torch profiler trace of the last sample here")
    p.add_argument("--tokenizer_path", type=Path, default=None, help="default: tokenizer.model beside the checkpoint")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--draft_checkpoint_path", type=Path, default=None,
                   help="speculative decoding with this draft (same vocabulary; e.g. the target's int8 copy)")
    p.add_argument("--speculate_k", type=int, default=5, help="tokens the draft proposes per target step")
    return p


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace):
    if a.max_new_tokens < 1 or a.num_samples < 1 or a.batch_size < 1:
        p.error("--max_new_tokens, --num_samples and --batch_size must be at least 1")
    if a.temperature < 0 or (a.top_k is not None and a.top_k < 1) or (a.top_p is not None and not 0 < a.top_p <= 1):
        p.error("need --temperature >= 0, --top_k >= 1 and 0 < --top_p <= 1")
    if not a.prompt:
        p.error("--prompt is empty")
    if a.speculate_k < 1:
        p.error("--speculate_k must be at least 1")


if __name__ == "__main__":
    env_rank = env_world()[0]  # under torchrun only rank 0 prints, errors included
    try:
        with rank0_output(env_rank):
            parser = build_parser()
            cli_args = parser.parse_args()
            check_args(parser, cli_args)
            main(**vars(cli_args))
    except (UserError, TokenizerError) as e:
        if env_rank == 0:
            sys.exit(f"error: {e}")
        time.sleep(5)  # torchrun stops the other workers once one exits non-zero: let rank 0 print the error first
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        shutdown_distributed()

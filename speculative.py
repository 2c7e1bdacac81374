"""Speculative decoding: a cheap draft model proposes k tokens, the target scores all of them in one forward and
keeps a prefix, so one target forward yields 1 to k+1 tokens with exactly the target's output distribution
(Leviathan et al. 2022, arXiv:2211.17192; Chen et al. 2023, arXiv:2302.01318).

    python generate.py --compile --checkpoint_path .../model.pth --draft_checkpoint_path .../model_int8.pth

The draft must share the target's vocabulary; any such checkpoint works, the target's own quantized copy
included. Batch size 1 only: rows accept different numbers of tokens, so their positions would diverge.

Cache bookkeeping (both models have static KV caches indexed by position; a query at position i attends only to
keys at positions <= i, see Transformer.setup_caches, so a cache entry beyond the current position is never
read and a rejected token's entry is harmless until it is overwritten):
- `token` is the last emitted token, at position `pos`; neither cache holds it yet. `prev` is the token at pos-1:
  the target's cache holds it; the draft's may not (below).
- The draft's first step runs on [prev, token] at pos-1, pos; then k-1 one-token steps on d1 .. d(k-1) at
  pos+1 .. pos+k-1. It proposes d1 .. dk.
- The target runs once on [token, d1 .. dk] at pos .. pos+k (k+1 positions written).
- With n drafts accepted, token, d1 .. dn at pos .. pos+n are emitted. The target's cache holds them all, and so
  does the draft's when n < k; when n = k the draft has not run on dk. The next token (a correction, or a bonus
  when n = k) goes to position pos+n+1, and the next round's prev is dn (token when n = 0), at pos+n: its first
  step caches dk when n = k, and otherwise rewrites an entry with the same input and position (the same values
  up to rounding). In the first round prev is the prompt's last token, which the draft's prefill cached.
So every round has the same shapes (draft [1, 2], k-1 times [1, 1], target [1, k+1]) and no branch on n: the
round compiles once (on GPU each of its three steps is one CUDA graph, replayed every round; on CPU the whole
round is one graph: compile_speculative_round), and the host reads the round's result once.
"""
import functools
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from generate import TokenStream, compile_step, draw, find_tokenizer, logits_to_probs, prefill, sample
from model import ModelArgs, Transformer, UserError, load_checkpoint
from tokenizer import TokenizerError


def draft_one_token(model: Transformer, tokens: Tensor, input_pos: Tensor, temperature: float = 0.0,
                    top_k: Optional[int] = None, top_p: Optional[float] = None):
    """One draft step: tokens [1, S] at input_pos [S] (all cached) -> (the token proposed after the last one [1, 1],
    the distribution [1, V] it was drawn from; None at temperature 0, where the proposal is the argmax)."""
    logits = model(tokens, input_pos)[:, -1]
    if temperature == 0:
        return sample(logits, 0.0), None
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return draw(probs), probs


def draft_two_tokens(model: Transformer, tokens: Tensor, input_pos: Tensor, temperature: float = 0.0,
                     top_k: Optional[int] = None, top_p: Optional[float] = None):
    """The round's first draft step, on [prev, token]: draft_one_token under a name of its own, so that it compiles
    to a graph of its own (torch.compile caches graphs per code object; generate.prefill does the same)."""
    return draft_one_token(model, tokens, input_pos, temperature, top_k, top_p)


def accept_drafts(target_probs: Tensor, draft_probs: Tensor, drafted: Tensor):
    """The acceptance rule (Leviathan et al. 2022, Algorithm 1; Chen et al. 2023, Algorithm 2), per row b.

    target_probs [B, k+1, V]: the target's distribution for the token after each of [last token, d1 .. dk];
    draft_probs [B, k, V]: the distributions the draft drew drafted [B, k] from.
    Draft i is accepted with probability min(1, p(di) / q(di)); at the first rejection a token is drawn from
    max(0, p - q) normalised, and when all k are accepted a bonus token from the target's last distribution.
    Returns (n [B]: drafts accepted, token [B, 1]: the token that follows them)."""
    k, vocab = drafted.size(-1), target_probs.size(-1)
    p = target_probs[:, :k].gather(-1, drafted[..., None])[..., 0]  # [B, k]
    q = draft_probs.gather(-1, drafted[..., None])[..., 0]  # [B, k], > 0: each di was drawn from q
    accepted = torch.rand_like(p) * q < p  # u < p/q, u ~ U[0, 1), without dividing
    n = accepted.long().cumprod(dim=-1).sum(dim=-1)  # [B]: the accepted prefix
    row = n[:, None, None].expand(-1, 1, vocab)
    p_n = target_probs.gather(1, row)[:, 0]  # [B, V]
    q_n = F.pad(draft_probs, (0, 0, 0, 1)).gather(1, row)[:, 0]  # a zero row after the last draft: the bonus
    residual = (p_n - q_n).clamp(min=0)
    # All zero only where p_n == q_n, and then a rejection has probability 0; fall back to p_n rather than to
    # the argmax of zeros.
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_n)
    return n, draw(residual)


def verify(model: Transformer, tokens: Tensor, input_pos: Tensor, draft_probs: Optional[Tensor],
           temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None):
    """The target's step: tokens [1, k+1] (the last emitted token, then k drafts) at input_pos [k+1], scored in one
    forward. draft_probs [1, k, V] (None at temperature 0). Returns (n [1]: drafts accepted, next token [1, 1])."""
    logits = model(tokens, input_pos)  # [1, k+1, V]
    drafted = tokens[:, 1:]
    if temperature == 0:  # accept while the draft agrees with the target's argmax, then take the target's
        best = logits.argmax(dim=-1)  # [1, k+1]
        n = (best[:, :-1] == drafted).long().cumprod(dim=-1).sum(dim=-1)
        return n, best.gather(1, n[:, None])
    return accept_drafts(logits_to_probs(logits, temperature, top_k, top_p), draft_probs, drafted)


def speculative_round(target: Transformer, draft: Transformer, last_two: Tensor, pos: Tensor, k: int,
                      temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                      first_step=draft_two_tokens, draft_step=draft_one_token, verify_step=verify):
    """One round on the device, with no branch on the outcome (module docstring): the draft proposes k tokens, the
    target scores them in one forward, the acceptance rule keeps a prefix.

    last_two [1, 2]: [prev, token], the tokens at positions pos - 1 and pos [1]; token is the last emitted one.
    Returns (drafted [1, k], n [1]: drafts accepted, next_two [1, 2]: the next round's last_two, whose second
    token is the one emitted after the n accepted drafts, at position pos + n + 1).
    first_step, draft_step, verify_step: the three steps, or their compiled copies (compile_speculative_round)."""
    # clones: under CUDA graphs a step's outputs are overwritten by the next step's replay
    proposed, probs = first_step(draft, last_two, pos + torch.arange(-1, 1, device=pos.device), temperature,
                                 top_k, top_p)  # prev rewritten (or, after n = k, first cached) at pos - 1
    drafted, draft_probs = [proposed.clone()], [None if probs is None else probs.clone()]
    for i in range(1, k):
        proposed, probs = draft_step(draft, drafted[-1], pos + i, temperature, top_k, top_p)
        drafted.append(proposed.clone())
        draft_probs.append(None if probs is None else probs.clone())
    tokens = torch.cat([last_two[:, 1:]] + drafted, dim=1)  # [1, k+1]: token, d1 .. dk
    n, next_token = verify_step(target, tokens, pos + torch.arange(k + 1, device=pos.device),
                                torch.stack(draft_probs, dim=1) if temperature > 0 else None,  # [1, k, V]
                                temperature, top_k, top_p)
    prev = tokens.gather(1, n[:, None])  # [1, 1]: dn, or token when n = 0, at position pos + n
    return tokens[:, 1:], n, torch.cat([prev, next_token], dim=1)


def compile_speculative_round(device, one_graph: Optional[bool] = None):
    """speculative_round compiled for every round (positions are tensors, k is fixed: nothing recompiles), with
    nothing in a round waiting for the host. one_graph (default: off CUDA) compiles the whole round as one graph;
    otherwise each of its three steps is a graph of its own, on GPU a CUDA graph each, and the few small ops
    between them run eagerly. On an H200 the whole round of a Llama-2-7B target with its int4 self-draft was still
    compiling after 7 minutes (inductor's graph partitioning), where the target's step compiles in 45 s, and under
    CUDA graphs separate steps cost next to nothing; on CPU each compiled call costs its guard checks, and the
    split round decoded 22% slower on a tiny model (the same on a 12-layer 768-wide one; BENCHMARKS.md, 2026-12-04)."""
    if one_graph is None:
        one_graph = torch.device(device).type != "cuda"
    if one_graph:
        return compile_step(speculative_round, device)
    return functools.partial(speculative_round, first_step=compile_step(draft_two_tokens, device),
                             draft_step=compile_step(draft_one_token, device),
                             verify_step=compile_step(verify, device))


def check_same_vocabulary(target: Transformer, draft: Transformer):
    if draft.args.vocab_size != target.args.vocab_size:
        raise UserError(f"the draft's vocabulary has {draft.args.vocab_size} tokens and the target's "
                        f"{target.args.vocab_size}; speculative decoding needs the same vocabulary")


@torch.no_grad()
def speculative_generate(target: Transformer, draft: Transformer, prompt: Tensor, max_new_tokens: int, *,
                         speculate_k: int = 5, temperature: float = 0.0, top_k: Optional[int] = None,
                         top_p: Optional[float] = None, stop_ids=(), on_token: Optional[Callable] = None,
                         prefill_fn=prefill, round_fn=speculative_round, timings: Optional[dict] = None):
    """Generate up to max_new_tokens after prompt [T] or [1, T] with the target's output distribution, drafting
    speculate_k tokens per target forward. Same contract as generate.generate (rows end at the first stop
    token; on_token([id]) per token); both models' caches must hold prompt + max_new_tokens + speculate_k
    positions. Returns (rows, stats): stats has `rounds` (target forwards after the prefill), `accepted_counts`
    (rounds that accepted 0 .. k drafts), `acceptance_by_position` (fraction of rounds whose i-th draft was
    accepted) and `mean_accepted` (drafts accepted per round; each round also emits one target token).
    round_fn: speculative_round, or its compiled copy from compile_speculative_round."""
    check_same_vocabulary(target, draft)
    prompt = prompt.view(1, -1) if prompt.dim() == 1 else prompt
    batch, length = prompt.shape
    k = speculate_k
    if batch != 1:
        raise UserError(f"speculative decoding supports batch size 1 only, not {batch}")
    if k < 1 or max_new_tokens < 1:
        raise UserError(f"need speculate_k >= 1 and max_new_tokens >= 1, not {k} and {max_new_tokens}")
    need = length + max_new_tokens + k
    for name, model in (("target", target), ("draft", draft)):
        if need > model.max_seq_length:
            raise UserError(f"prompt ({length}) + max_new_tokens ({max_new_tokens}) + speculate_k ({k}) does not "
                            f"fit the {name}'s cache ({model.max_seq_length}); call setup_caches")
    device = prompt.device
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    stream = TokenStream(1, stop_ids, on_token, "cpu")  # each round ends on the host anyway
    row = stream.rows[0]
    t0 = time.perf_counter()
    positions = torch.arange(length, device=device)
    token = prefill_fn(target, prompt, positions, **sampling)  # [1, 1], as generate's first token
    draft(prompt, positions)  # fills the draft's cache; its prediction is not needed
    stream.push(token.cpu())
    t1 = time.perf_counter()
    last_two = torch.cat([prompt[:, -1:], token], dim=1)  # [prev, token]: the prompt's last token, then token
    pos = torch.tensor([length], device=device)  # the position of `token`, in neither cache yet
    accepted_counts = [0] * (k + 1)
    while len(row) < max_new_tokens and not stream.done:
        drafted, n, last_two = round_fn(target, draft, last_two, pos, k, **sampling)
        host = torch.cat([drafted[0], n, last_two[0, 1:]]).tolist()  # the round's one host sync
        last_two = last_two.clone()  # a one-graph round's outputs are overwritten by its next CUDA graph replay
        n = host[k]
        accepted_counts[n] += 1
        pos = pos + (n + 1)
        for t in host[:n] + [host[k + 1]]:
            if len(row) == max_new_tokens or stream.done:
                break
            stream.push(torch.tensor([t]))
    t2 = time.perf_counter()
    if timings is not None:  # decode_steps counts tokens, as generate's one-token steps do
        timings.update(prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=len(row) - 1)
    return stream.rows, acceptance_stats(accepted_counts)


def acceptance_stats(accepted_counts: list) -> dict:
    """accepted_counts[n]: target steps that accepted n of the k drafts -> speculative_generate's stats."""
    rounds, k = sum(accepted_counts), len(accepted_counts) - 1
    return dict(rounds=rounds, speculate_k=k, accepted_counts=list(accepted_counts),
                acceptance_by_position=[sum(accepted_counts[i:]) / max(rounds, 1) for i in range(1, k + 1)],
                mean_accepted=sum(n * c for n, c in enumerate(accepted_counts)) / max(rounds, 1))


def format_stats(stats: dict) -> str:
    """One line: acceptance by draft position and tokens per target forward."""
    by_position = " ".join(f"{r:.2f}" for r in stats["acceptance_by_position"])
    return (f"acceptance by draft position {by_position}; mean accepted {stats['mean_accepted']:.2f} of "
            f"{stats['speculate_k']} drafts per step ({stats['mean_accepted'] + 1:.2f} tokens per target forward, "
            f"{stats['rounds']} steps)")


def check_draft_checkpoint(draft_path: Path, target_ckpt: dict, target_tokenizer_path: Path) -> dict:
    """Open the draft checkpoint (memory-mapped) and refuse it, before any weights are read, unless its vocabulary
    is the target's: the same vocab_size, special tokens and, where a tokenizer file sits beside the draft, the
    same file content. Returns the opened checkpoint for load_model."""
    draft_ckpt = load_checkpoint(draft_path)
    target_vocab = ModelArgs.from_dict(target_ckpt["model_args"]).vocab_size
    draft_vocab = ModelArgs.from_dict(draft_ckpt["model_args"]).vocab_size
    if draft_vocab != target_vocab:
        raise UserError(f"draft {draft_path} has a vocabulary of {draft_vocab} tokens, the target {target_vocab}; "
                        "speculative decoding needs the same vocabulary")
    specials = [(c.get("tokenizer") or {}).get("special_tokens") or {} for c in (target_ckpt, draft_ckpt)]
    if specials[0] != specials[1]:
        raise UserError(f"draft {draft_path} has other special tokens than the target; speculative decoding needs "
                        "the same tokenizer")
    try:
        draft_tokenizer = find_tokenizer(Path(draft_path))
    except TokenizerError:  # none beside the draft: it is read with the target's
        return draft_ckpt
    if draft_tokenizer.read_bytes() != Path(target_tokenizer_path).read_bytes():
        raise UserError(f"the draft's tokenizer {draft_tokenizer} differs from the target's "
                        f"{target_tokenizer_path}; speculative decoding needs the same tokenizer")
    return draft_ckpt

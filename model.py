"""The Llama-family transformer (Llama 2/3/3.1/3.2, Mistral, CodeLlama, Qwen2) with a static KV cache.

Weights use the Meta layout: q/k rows of each head are in interleaved rotary order (HF's checkpoints permute
them; scripts/convert_hf_checkpoint.py undoes that), q/k/v are fused into `wqkv` and the SwiGLU gate and up
projections into `w13`. This file knows nothing of quantization or tensor parallelism: those swap modules.
"""
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


CHECKPOINT_FORMAT = "llama-fast/1"


class UserError(Exception):
    """Bad input from the user: the CLIs print the message on one line and exit non-zero."""


class ConfigError(UserError):
    """A checkpoint config this model cannot represent."""


class CheckpointError(UserError):
    """A checkpoint file that is missing, truncated or not ours."""


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int
    max_seq_len: int  # the context the model was trained for (max_position_embeddings)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # {"rope_type": "linear", "factor": f} or {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: Optional[dict] = None
    qkv_bias: bool = False  # Qwen2
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B, small Qwen2
    sliding_window: Optional[int] = None  # Mistral v0.1: each query sees at most this many keys
    arch: str = "llama"

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Build from a transformers `config.json` (old and new transformers layouts alike)."""
        arch = cfg.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"model_type {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported (only silu)")
        if cfg.get("mlp_bias"):
            raise ConfigError("mlp_bias=true is not supported")
        n_heads = cfg["num_attention_heads"]
        dim = cfg["hidden_size"]
        # transformers >= 5 nests rope_theta and the scaling in "rope_parameters"; older ones keep
        # "rope_theta" and "rope_scaling" (with "type" before "rope_type" existed) at the top level.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
        rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope type {rope_type!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        rope_scaling = None if rope_type == "default" else {"rope_type": rope_type, **rope}
        sliding_window = None
        if arch == "mistral":
            sliding_window = cfg.get("sliding_window")
        elif arch == "qwen2" and cfg.get("use_sliding_window"):
            raise ConfigError("Qwen2 with use_sliding_window=true is not supported")
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=dim,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            intermediate_size=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or dim // n_heads,
            max_seq_len=cfg.get("max_position_embeddings", 4096),
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=sliding_window,
            arch=arch,
        )


class KVCache(nn.Module):
    def __init__(self, max_batch_size: int, max_seq_length: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor):
        # input_pos: [S], k, v: [B, H_kv, S, D]
        bsz = k.shape[0]
        self.k_cache[:bsz, :, input_pos] = k
        self.v_cache[:bsz, :, input_pos] = v
        return self.k_cache[:bsz], self.v_cache[:bsz]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 as the reference does, then scale in the model's dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        qkv_out = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        self.wqkv = nn.Linear(args.dim, qkv_out, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Optional[Tensor]) -> Tensor:
        bsz, seqlen, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, self.n_heads, self.head_dim)
        k = k.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, rope), apply_rotary_emb(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        if input_pos is not None and self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # [B, H_kv, max_seq, D]
        # enable_gqa: each group of n_heads // n_kv_heads query heads reads one KV head in place, rather
        # than copying the cache n_heads // n_kv_heads times per step.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads)
        y = y.transpose(1, 2).reshape(bsz, seqlen, q_size)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # gate (w1) and up (w3) projections fused into one matmul: one weight read, one launch.
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Optional[Tensor]) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
            self._register_load_state_dict_pre_hook(self._fill_tied_output)
            self.register_load_state_dict_post_hook(Transformer._retie_output)
        self.max_batch_size = -1
        self.max_seq_length = -1

    @staticmethod
    def _fill_tied_output(state_dict, prefix, *_):
        # Tied checkpoints store the embedding once; the output head reads the same tensor.
        key = prefix + "tok_embeddings.weight"
        if key in state_dict and prefix + "output.weight" not in state_dict:
            state_dict[prefix + "output.weight"] = state_dict[key]

    @staticmethod
    def _retie_output(module, _incompatible_keys):
        # load_state_dict(assign=True) gives each key its own Parameter; share one again so that
        # .to(device) copies the table once.
        module.output.weight = module.tok_embeddings.weight

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        """Allocate the KV cache, rotary table and attention mask for up to this batch and length."""
        if self.max_batch_size >= max_batch_size and self.max_seq_length >= max_seq_length:
            return
        args = self.args
        # The embedding table stays in the activation dtype whatever else is swapped in.
        dtype, device = self.tok_embeddings.weight.dtype, self.tok_embeddings.weight.device
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        for layer in self.layers:  # each attention's own head count: tensor parallelism gives it a share
            attention = layer.attention
            attention.kv_cache = KVCache(max_batch_size, max_seq_length, attention.n_kv_heads, args.head_dim,
                                         dtype, device)
        self.register_buffer("rope", precompute_rope(max_seq_length, args, device), persistent=False)
        self.register_buffer("causal_mask", causal_mask(max_seq_length, args.sliding_window, device),
                             persistent=False)

    def forward(self, idx: Tensor, input_pos: Optional[Tensor] = None) -> Tensor:
        """idx: [B, S] token ids at positions input_pos: [S]; returns logits [B, S, vocab] in float32.

        input_pos None: idx is a whole sequence from position 0, attended causally without the KV cache
        (training and scoring; needs no setup_caches)."""
        if input_pos is None:
            seqlen = idx.size(1)
            mask = causal_mask(seqlen, self.args.sliding_window, idx.device)[None, None]  # [1, 1, S, S]
            rope = precompute_rope(seqlen, self.args, idx.device)
        else:
            assert self.max_seq_length > 0, "call setup_caches() before forward() with input_pos"
            mask = self.causal_mask[None, None, input_pos]  # [1, 1, S, max_seq]
            rope = self.rope[input_pos]  # [S, D/2, 2]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, rope, mask, input_pos)
        return self.output(self.norm(x)).float()


def causal_mask(seq_len: int, sliding_window: Optional[int], device=None) -> Tensor:
    """mask[i, j] [seq_len, seq_len]: the query at position i may attend to the key at position j."""
    pos = torch.arange(seq_len, device=device)
    mask = pos[:, None] >= pos[None, :]
    if sliding_window is not None:
        mask &= pos[:, None] - pos[None, :] < sliding_window
    return mask


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Rotary inverse frequencies [head_dim/2] in float32, with the checkpoint's frequency scaling."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    kind, factor = scaling["rope_type"], float(scaling["factor"])
    if kind == "linear":  # positions divided by the factor (Chen et al. 2023, arXiv:2306.15595)
        return inv_freq / factor
    # "llama3": long wavelengths slowed by `factor`, short ones kept, a smooth blend between
    # (Llama 3.1 release; the same rule as Meta's reference code).
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_ctx / low, inv_freq / factor, blended)
    return torch.where(wavelen < old_ctx / high, inv_freq, out)


def precompute_rope(seq_len: int, args: ModelArgs, device=None) -> Tensor:
    """cos/sin table [seq_len, head_dim/2, 2] in float32."""
    inv_freq = rope_inv_freq(args).to(device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rotary_emb(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x: [B, S, H, D] by rope: [S, D/2, 2]."""
    xp = x.float().reshape(*x.shape[:-1], -1, 2)  # [B, S, H, D/2, 2]
    rope = rope.view(1, xp.size(1), 1, xp.size(3), 2)
    cos, sin = rope[..., 0], rope[..., 1]
    out = torch.stack([xp[..., 0] * cos - xp[..., 1] * sin,
                       xp[..., 1] * cos + xp[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)


def save_checkpoint(path, state_dict: dict, args: ModelArgs, tokenizer: Optional[dict] = None,
                    quantization: Optional[dict] = None, force: bool = False):
    """Write a checkpoint whose config travels with its weights, atomically (temp file, then rename).

    tokenizer: bos/eos ids, special tokens and chat format; quantization: the scheme, None for float.
    """
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    payload = {"format": CHECKPOINT_FORMAT, "model_args": args.to_dict(), "tokenizer": tokenizer or {},
               "quantization": quantization, "state_dict": state_dict}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:  # interrupted or failed: leave nothing half-written behind
        os.unlink(tmp)
        raise


def load_checkpoint(path) -> dict:
    """Read a checkpoint memory-mapped (weights stay on disk until used) and check its format."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; convert one with scripts/convert_hf_checkpoint.py")
    try:
        ckpt = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              "is it complete? convert it again") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint; convert it with "
                              "scripts/convert_hf_checkpoint.py")
    return ckpt

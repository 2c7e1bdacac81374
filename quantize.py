"""Weight-only quantization: the conversion step and the runtime linear layers that read its checkpoints.

    python quantize.py --checkpoint_path checkpoints/.../model.pth --mode int8                  # -> model_int8.pth
    python quantize.py --checkpoint_path checkpoints/.../model.pth --mode int4 --groupsize 128  # -> model_int4.g128.pth

The scheme is recorded in the checkpoint ({"scheme": "int8"} or {"scheme": "int4", "group_size": 128}) and
generate.py swaps the layers from that record, never from the file name.

int8: each output row is scaled by its absolute maximum / 127 and rounded (symmetric, per output channel). The
runtime layer dequantizes on the fly; under torch.compile that fuses into the matmul, so a decode step reads 1
byte per weight instead of 2.

int4: each row is cut into groups of `group_size` input columns (32, 64, 128 or 256); a group's weights map
to 16 levels between its minimum and maximum, w ~= q * scale + offset with q in 0..15 (asymmetric: the
offset is the group minimum; tests/test_quantize.py measures that this loses less than a symmetric grid).
On CUDA the layer runs int4_matmul, a Triton kernel below; elsewhere it dequantizes in PyTorch, which is also
the kernel's test oracle.

Layouts (portable: plain tensors, the same checkpoint loads on any device; tensor parallelism shards them):
- Int8Linear.weight: int8 [out_features, in_features], the float weight's shape; .scales: [out_features].
- Int4Linear.weight: uint8 [out_features, padded_in // 2]; byte j of a row holds input column 2j in its low
  nibble and 2j + 1 in its high nibble. padded_in is in_features rounded up to a multiple of group_size; the
  padding columns are zero and the kernel never reads past in_features of x. .scales and .offsets:
  [out_features, padded_in // group_size], in the model's float dtype.
- Column-parallel (split out_features): split every tensor's rows. Row-parallel (split in_features): split
  weight columns and scales/offsets columns at group boundaries (in_features / world a multiple of group_size).
"""
import argparse
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model import CheckpointError, UserError, load_checkpoint, save_checkpoint

try:  # Triton ships with CUDA builds of torch; without it the int4 layer uses its PyTorch path
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)


# ------------------------------------------------------------------------------------------------- int8

def quantize_int8(weight: Tensor) -> tuple:
    """Symmetric per-output-channel int8: (q [N, K] int8, scales [N]) with weight ~= q * scales[:, None]."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales.to(weight.dtype)


class Int8Linear(nn.Module):
    """y = (x @ q.T) * scales (+ bias), q int8 per-channel-quantized weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and triton is not None and x.numel() == x.shape[-1] and self.in_features % 4 == 0:
            # decode: our GEMV reads the int8 bytes once; inductor's fused dequant-matmul is slower at one row
            y = int8_gemv(x.reshape(1, -1), self.weight, self.scales).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return y + self.bias if self.bias is not None else y


# ------------------------------------------------------------------------------------------------- int4

def quantize_int4(weight: Tensor, group_size: int, symmetric: bool = False) -> tuple:
    """Groupwise int4: (packed uint8 [N, Kp // 2], scales [N, Kp // g], offsets [N, Kp // g]) with
    weight ~= q * scale + offset per group, Kp = K rounded up to the group size (zero padding).
    symmetric=True puts the grid symmetric around zero (offset = -8 * scale), kept for comparison."""
    n, k = weight.shape
    padded = -(-k // group_size) * group_size
    w = F.pad(weight.float(), (0, padded - k)).view(n, padded // group_size, group_size)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        scales = (w.abs().amax(dim=-1) / 7).clamp(min=tiny)
        offsets = -8 * scales
    else:
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scales, offsets = ((hi - lo) / 15).clamp(min=tiny), lo
    # round against the scales and offsets as they will be stored, so storage rounding does not add error
    scales, offsets = scales.to(weight.dtype), offsets.to(weight.dtype)
    q = torch.round((w - offsets.float()[..., None]) / scales.float()[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.view(n, padded)
    return q[:, 0::2] | (q[:, 1::2] << 4), scales, offsets


def dequantize_int4(packed: Tensor, scales: Tensor, offsets: Tensor, in_features: int, dtype) -> Tensor:
    """The float weight [N, in_features] that quantize_int4's output stands for."""
    n = packed.shape[0]
    q = torch.stack((packed & 15, packed >> 4), dim=-1).view(n, scales.shape[1], -1)  # [N, groups, g]
    w = q.float() * scales.float()[..., None] + offsets.float()[..., None]
    return w.view(n, -1)[:, :in_features].to(dtype)


class Int4Linear(nn.Module):
    """y = x @ dequant(q).T (+ bias) for groupwise int4 weights in the layout described at the top."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 128,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = -(-in_features // group_size)
        self.register_buffer("weight", torch.empty(out_features, groups * group_size // 2, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("offsets", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and triton is not None:
            y = int4_matmul(x.reshape(-1, x.shape[-1]), self.weight, self.scales, self.offsets, self.group_size)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, dequantize_int4(self.weight, self.scales, self.offsets, self.in_features, x.dtype))
        return y + self.bias if self.bias is not None else y


if triton is not None:
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, o_ptr, y_ptr, N, K, row_words, stride_wn, stride_sn, k_per_split,
                     BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_K: tl.constexpr):
        """y[split, N] = dequant(w) @ x[K] over this split's share of K, for one row x (decode). BITS = 4:
        int4 with a scale and offset per GROUP columns (BLOCK_K <= GROUP, so a block lies in one group).
        BITS = 8: signed int8 with one scale per row (GROUP spans the row; o_ptr unused).

        Each int32 word of a row holds 32 / BITS values, column (32 / BITS) t + i at bits BITS * i. Moving a
        value u to the top mantissa bits (22 down) and or-ing in the exponent of 1.0 gives f = 1 + u / 2^BITS
        with two integer ops, no int-to-float conversion (a slow instruction). Then u * s + o =
        f * (2^BITS s) + (o - 2^BITS s), so a group adds 2^BITS s * sum(x f) + (o - 2^BITS s) * sum(x):
        one multiply-add per weight, the scales applied once per group. int8 stores b = u - 128."""
        PER_WORD: tl.constexpr = 32 // BITS
        WORDS: tl.constexpr = BLOCK_K // PER_WORD
        MANTISSA: tl.constexpr = ((1 << BITS) - 1) << (23 - BITS)
        pid_n, split = tl.program_id(0), tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        k_start = split * k_per_split
        k_end = tl.minimum(k_start + k_per_split, tl.cdiv(K, BLOCK_K) * BLOCK_K)
        for k0 in range(k_start, k_end, BLOCK_K):
            t = k0 // PER_WORD + tl.arange(0, WORDS)
            if EVEN_K:  # (int4 rows are padded to whole groups, so they never end inside a block)
                words = tl.load(w_ptr + rn[:, None] * stride_wn + t[None, :], mask=n_ok[:, None], other=0)
            else:  # the last block runs past the row's end
                words = tl.load(w_ptr + rn[:, None] * stride_wn + t[None, :],
                                mask=n_ok[:, None] & (t < row_words)[None, :], other=0)  # [BN, WORDS]
            if BITS == 8:
                words = words ^ -0x7F7F7F80  # 0x80808080 as int32: signed bytes b -> unsigned u = b + 128
            xf = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
            x_sum = tl.zeros((WORDS,), dtype=tl.float32)
            for i in tl.static_range(PER_WORD):
                col = PER_WORD * t + i  # the columns of value i of each word
                if EVEN_K:
                    x = tl.load(x_ptr + col).to(tl.float32)
                else:
                    x = tl.load(x_ptr + col, mask=col < K, other=0.0).to(tl.float32)
                if BITS * i <= 23 - BITS:
                    bits = words << (23 - BITS - BITS * i)
                else:
                    bits = words >> (BITS * i - 23 + BITS)
                f = ((bits & MANTISSA) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + u / 2^BITS
                xf += x[None, :] * f
                x_sum += x
            g = k0 // GROUP
            s = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
            if BITS == 8:
                o = -128.0 * s
            else:
                o = tl.load(o_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
            s = s * (1 << BITS)
            acc += tl.sum(xf, axis=1) * s + tl.sum(x_sum, axis=0) * (o - s)
        tl.store(y_ptr + split * N + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _int4_matmul_kernel(x_ptr, w_ptr, s_ptr, o_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                            GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """y[M, N] = x[M, K] @ dequant(w).T for several rows (speculative verify, prefill): dequantize a block
        in registers and multiply on tensor cores, accumulating in float32. BLOCK_K <= GROUP."""
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_ok, m_ok = rn < N, rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K) * BLOCK_K, BLOCK_K):
            j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # packed byte index; holds columns 2j (low), 2j + 1 (high)
            packed = tl.load(w_ptr + rn[:, None] * stride_wn + j[None, :], mask=n_ok[:, None], other=0)
            x_even = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * j[None, :],
                             mask=m_ok[:, None] & (2 * j < K)[None, :], other=0.0)
            x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * j[None, :] + 1,
                            mask=m_ok[:, None] & (2 * j + 1 < K)[None, :], other=0.0)
            g = k0 // GROUP
            s = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            o = tl.load(o_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            w_lo = ((packed & 15).to(tl.float32) * s + o).to(x_ptr.dtype.element_ty)  # [BN, BK / 2]
            w_hi = ((packed >> 4).to(tl.float32) * s + o).to(x_ptr.dtype.element_ty)
            acc += tl.dot(x_even, tl.trans(w_lo), input_precision=DOT_PRECISION)
            acc += tl.dot(x_odd, tl.trans(w_hi), input_precision=DOT_PRECISION)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def int4_config(m: int, n: int, group_size: int) -> dict:
    """Block sizes and warps for int4_matmul: decode (m = 1) takes the GEMV kernel, more rows the tensor-core
    kernel. Tuned on H200 with scripts/bench.py --int4_sweep (BENCHMARKS.md)."""
    if m == 1:
        return dict(BLOCK_N=32, BLOCK_K=min(group_size, 128), SPLIT_K=8, num_warps=1)
    return dict(BLOCK_M=16 if m <= 16 else 64, BLOCK_N=64, BLOCK_K=min(group_size, 128), num_warps=4)


def gemv(x: Tensor, words: Tensor, scales: Tensor, offsets: Optional[Tensor], bits: int, group_size: int,
         config: dict) -> Tensor:
    """x [1, K] @ dequant(words).T -> [1, N] with _gemv_kernel; words: the weight viewed as int32 [N, K*bits/32]."""
    k, n = x.shape[1], words.shape[0]
    config = dict(config)
    split = config.pop("SPLIT_K", 1)  # programs sharing a row's K: more loads in flight when N is small
    blocks = triton.cdiv(k, config["BLOCK_K"])
    k_per_split = triton.cdiv(blocks, split) * config["BLOCK_K"]
    y = torch.empty(split, n, device=x.device, dtype=x.dtype if split == 1 else torch.float32)
    scale_stride = scales.stride(0) if scales.dim() > 1 else 1  # int8: one scale per row
    _gemv_kernel[(triton.cdiv(n, config["BLOCK_N"]), split)](
        x, words, scales, scales if offsets is None else offsets, y, n, k, words.shape[1], words.stride(0),
        scale_stride, k_per_split, BITS=bits, GROUP=group_size, EVEN_K=k % config["BLOCK_K"] == 0, **config)
    return y if split == 1 else y.sum(0, keepdim=True).to(x.dtype)


def int4_matmul(x: Tensor, packed: Tensor, scales: Tensor, offsets: Tensor, group_size: int,
                config: Optional[dict] = None) -> Tensor:
    """x [M, K] @ dequant(packed).T -> [M, N] with the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).
    config: block sizes and num_warps (default int4_config); BLOCK_K must divide group_size."""
    x = x.contiguous()
    m, k = x.shape
    n = packed.shape[0]
    config = config or int4_config(m, n, group_size)
    if m == 1:
        return gemv(x, packed.view(torch.int32), scales, offsets, 4, group_size, config)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(m, config["BLOCK_M"]))
    # float32 inputs get exact float32 products, not TF32's 10-bit mantissas
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _int4_matmul_kernel[grid](x, packed, scales, offsets, y, m, n, k, x.stride(0), packed.stride(0),
                              scales.stride(0), y.stride(0), GROUP=group_size, DOT_PRECISION=precision, **config)
    return y


INT8_GEMV_CONFIG = dict(BLOCK_N=32, BLOCK_K=512, SPLIT_K=4, num_warps=4)  # H200 sweep, BENCHMARKS.md


def int8_gemv(x: Tensor, weight: Tensor, scales: Tensor, config: Optional[dict] = None) -> Tensor:
    """x [1, K] @ (weight * scales[:, None]).T -> [1, N] for int8 weight [N, K], K a multiple of 4."""
    config = config or INT8_GEMV_CONFIG
    group = triton.cdiv(x.shape[1], config["BLOCK_K"]) * config["BLOCK_K"]  # one scale for the whole row
    return gemv(x.contiguous(), weight.view(torch.int32), scales, None, 8, group, config)


# ---------------------------------------------------------------------------------------- model surgery

def quantizable_linears(model: nn.Module):
    """(qualified name, parent, attribute, linear) for every plain nn.Linear except an output head tied to the
    embedding, which stays float so the table is stored once."""
    tied = getattr(model, "tok_embeddings", None)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and not (tied is not None and child.weight is tied.weight):
                yield f"{parent_name}.{name}" if parent_name else name, parent, name, child


def make_scheme(mode: str, group_size: int = 128) -> dict:
    """The checkpoint's record of a --mode (and --groupsize for int4)."""
    if mode not in SCHEMES:
        raise UserError(f"unknown --mode {mode!r}; known: {', '.join(SCHEMES)}")
    if mode == "int4":
        if group_size not in INT4_GROUP_SIZES:
            raise UserError(f"--groupsize {group_size} is not supported; use one of {INT4_GROUP_SIZES}")
        return {"scheme": "int4", "group_size": group_size}
    return {"scheme": mode}


def swap_linears(model: nn.Module, scheme: dict) -> nn.Module:
    """Replace the model's linears by the runtime layers of `scheme` (a checkpoint's "quantization" record),
    in place, keeping each layer's device; weights are filled afterwards by load_state_dict."""
    kind = scheme.get("scheme")
    if kind not in SCHEMES or (kind == "int4" and scheme.get("group_size") not in INT4_GROUP_SIZES):
        raise CheckpointError(f"unknown quantization scheme {scheme}; known: {', '.join(SCHEMES)}")
    for _, parent, name, lin in quantizable_linears(model):
        kw = dict(bias=lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype)
        if kind == "int4":
            layer = Int4Linear(lin.in_features, lin.out_features, group_size=scheme["group_size"], **kw)
        else:
            layer = Int8Linear(lin.in_features, lin.out_features, **kw)
        setattr(parent, name, layer)
    return model


@torch.no_grad()
def quantize_state_dict(state_dict: dict, linear_names: list, scheme: dict) -> dict:
    """A copy of state_dict with each named linear's weight quantized (and its scales/offsets added)."""
    out = dict(state_dict)
    for name in linear_names:
        w = state_dict[f"{name}.weight"]
        if scheme["scheme"] == "int4":
            out[f"{name}.weight"], out[f"{name}.scales"], out[f"{name}.offsets"] = quantize_int4(w, scheme["group_size"])
        else:
            out[f"{name}.weight"], out[f"{name}.scales"] = quantize_int8(w)
    return out


def default_output_path(checkpoint_path: Path, scheme: dict) -> Path:
    tag = scheme["scheme"] + (f".g{scheme['group_size']}" if "group_size" in scheme else "")
    return checkpoint_path.with_name(f"{checkpoint_path.stem}_{tag}{checkpoint_path.suffix}")


def quantize_checkpoint(checkpoint_path, mode: str, output: Optional[Path] = None, force: bool = False,
                        group_size: int = 128) -> Path:
    """Write a quantized copy of a float checkpoint; returns its path."""
    from model import ModelArgs, Transformer

    scheme = make_scheme(mode, group_size)
    checkpoint_path = Path(checkpoint_path)
    output = Path(output) if output else default_output_path(checkpoint_path, scheme)
    if output.exists() and not force:
        raise UserError(f"{output} exists; pass --force to overwrite it")
    ckpt = load_checkpoint(checkpoint_path)
    if ckpt.get("quantization"):
        raise UserError(f"{checkpoint_path} is already quantized ({ckpt['quantization']['scheme']}); "
                        "quantize the float checkpoint instead")
    args = ModelArgs.from_dict(ckpt["model_args"])
    with torch.device("meta"):
        model = Transformer(args)
    names = [name for name, *_ in quantizable_linears(model)]
    state_dict = quantize_state_dict(ckpt["state_dict"], names, scheme)
    save_checkpoint(output, state_dict, args, ckpt.get("tokenizer"), quantization=scheme, force=force)
    return output


def main(checkpoint_path: Path, mode: str, groupsize: int, output: Optional[Path], force: bool):
    print(f"wrote {quantize_checkpoint(checkpoint_path, mode, output, force, groupsize)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Quantize a checkpoint's weights (weight-only).")
    parser.add_argument("--checkpoint_path", type=Path, required=True, help="a float model.pth")
    parser.add_argument("--mode", choices=SCHEMES, required=True)
    parser.add_argument("--groupsize", type=int, default=128, choices=INT4_GROUP_SIZES,
                        help="int4: input columns sharing one scale and offset")
    parser.add_argument("--output", type=Path, default=None,
                        help="default: beside the input, e.g. model_int8.pth, model_int4.g128.pth")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    try:
        main(**vars(parser.parse_args()))
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; nothing was written")

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
On CUDA the layer runs int4_matmul, a Triton kernel in decode_kernels.py; elsewhere it dequantizes in PyTorch, which
is also the kernel's test oracle.

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

from decode_kernels import int4_matmul, int8_gemv, triton

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
            # decode: our GEMV (decode_kernels.py) reads the int8 bytes once; inductor's fused dequant-matmul is
            # slower
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

"""Weight-only quantization: the conversion step and the runtime linear layers that read its checkpoints.

    python quantize.py --checkpoint_path checkpoints/.../model.pth --mode int8     # -> model_int8.pth

int8: each output row of a weight is scaled by its own absolute maximum / 127 and rounded (symmetric, per
output channel). The runtime layer multiplies by the float weight it dequantizes on the fly and scales the
result; under torch.compile the dequantization fuses into the matmul, so a decode step reads 1 byte per weight
instead of 2. The scheme is recorded in the checkpoint and generate.py swaps the layers from that record,
never from the file name.

Layout (for tensor parallelism to shard): Int8Linear.weight is int8 [out_features, in_features], exactly the
float weight's shape; Int8Linear.scales is [out_features]. Both split along out_features together (column
parallel), and a row-parallel split along in_features keeps scales whole.
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

SCHEMES = ("int8",)


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
        y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return y + self.bias if self.bias is not None else y


def quantizable_linears(model: nn.Module):
    """(qualified name, parent, attribute, linear) for every plain nn.Linear except an output head tied to the
    embedding, which stays float so the table is stored once."""
    tied = getattr(model, "tok_embeddings", None)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and not (tied is not None and child.weight is tied.weight):
                yield f"{parent_name}.{name}" if parent_name else name, parent, name, child


def swap_linears(model: nn.Module, scheme: dict) -> nn.Module:
    """Replace the model's linears by the runtime layers of `scheme` (a checkpoint's "quantization" record),
    in place, keeping each layer's device; weights are filled afterwards by load_state_dict."""
    kind = scheme.get("scheme")
    if kind != "int8":
        raise CheckpointError(f"unknown quantization scheme {kind!r}; known: {', '.join(SCHEMES)}")
    for _, parent, name, lin in quantizable_linears(model):
        setattr(parent, name, Int8Linear(lin.in_features, lin.out_features, lin.bias is not None,
                                         device=lin.weight.device, dtype=lin.weight.dtype))
    return model


@torch.no_grad()
def quantize_state_dict(state_dict: dict, linear_names: list, mode: str) -> dict:
    """A copy of state_dict with each named linear's weight quantized (its '.scales' added)."""
    out = dict(state_dict)
    for name in linear_names:
        q, scales = quantize_int8(state_dict[f"{name}.weight"])
        out[f"{name}.weight"], out[f"{name}.scales"] = q, scales
    return out


def default_output_path(checkpoint_path: Path, mode: str) -> Path:
    return checkpoint_path.with_name(f"{checkpoint_path.stem}_{mode}{checkpoint_path.suffix}")


def quantize_checkpoint(checkpoint_path, mode: str, output: Optional[Path] = None, force: bool = False) -> Path:
    """Write a quantized copy of a float checkpoint; returns its path."""
    from model import ModelArgs, Transformer

    if mode not in SCHEMES:
        raise UserError(f"unknown --mode {mode!r}; known: {', '.join(SCHEMES)}")
    checkpoint_path = Path(checkpoint_path)
    output = Path(output) if output else default_output_path(checkpoint_path, mode)
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
    state_dict = quantize_state_dict(ckpt["state_dict"], names, mode)
    save_checkpoint(output, state_dict, args, ckpt.get("tokenizer"), quantization={"scheme": mode}, force=force)
    return output


def main(checkpoint_path: Path, mode: str, output: Optional[Path], force: bool):
    print(f"wrote {quantize_checkpoint(checkpoint_path, mode, output, force)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Quantize a checkpoint's weights (weight-only).")
    parser.add_argument("--checkpoint_path", type=Path, required=True, help="a float model.pth")
    parser.add_argument("--mode", choices=SCHEMES, required=True)
    parser.add_argument("--output", type=Path, default=None, help="default: beside the input, e.g. model_int8.pth")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    try:
        main(**vars(parser.parse_args()))
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; nothing was written")

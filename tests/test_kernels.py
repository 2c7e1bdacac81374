"""kernels.py: the decode GEMV with its fused prologues, and fuse_decode's module swap, against PyTorch.
Without a GPU the Triton kernels run in Triton's interpreter (conftest.py), in float32."""
import pytest
import torch
import torch.nn.functional as F

from generate import load_model
from kernels import DecodeLinear, fuse_decode, gemv
from model import RMSNorm
from quantize import dequantize_int4, quantize_checkpoint, quantize_int4, quantize_int8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # the interpreter's bf16 is not the GPU's
TOL = 1e-2 if DEVICE == "cuda" else 1e-5  # relative; bf16 rounding of inputs and output on the GPU


def weight_in(bits: int, w: torch.Tensor, group_size: int = 64):
    """(operands for gemv, the float weight they stand for) in format `bits`."""
    if bits == 8:
        q, scales = quantize_int8(w)
        return dict(weight=q, scales=scales, bits=8), q.float() * scales.float()[:, None]
    if bits == 4:
        packed, scales, offsets = quantize_int4(w, group_size)
        return (dict(weight=packed, scales=scales, offsets=offsets, bits=4, group_size=group_size),
                dequantize_int4(packed, scales, offsets, w.shape[1], torch.float32))
    return dict(weight=w), w.float()


@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize("prologue", [None, "rmsnorm", "swiglu"])
@pytest.mark.parametrize("n,k,split", [(40, 320, 1), (17, 1000, 3)])
def test_gemv_with_a_fused_prologue_matches_pytorch(bits, prologue, n, k, split):
    g = torch.Generator().manual_seed(n * k + bits)
    w = torch.randn(n, k, generator=g).to(DTYPE)
    x = torch.randn(1, 2 * k if prologue == "swiglu" else k, generator=g).to(DTYPE) * 3
    norm_weight = torch.rand(k, generator=g).to(DTYPE) + 0.5
    ops, w_float = weight_in(bits, w)
    xf = x.float()
    if prologue == "rmsnorm":
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_weight.float()
    if prologue == "swiglu":
        gate, up = xf.chunk(2, dim=-1)
        xf = F.silu(gate) * up
    expected = xf @ w_float.T
    # blocks that do not divide K, and split-K (partial sums, and sums of squares, combined after the kernel)
    block_k = 256 if bits != 4 else 64
    config = dict(BLOCK_N=8, BLOCK_K=block_k, SPLIT_K=split, num_warps=2)
    ops = {key: (v.to(DEVICE) if torch.is_tensor(v) else v) for key, v in ops.items()}
    got = gemv(x.to(DEVICE), config=config, prologue=prologue, norm_weight=norm_weight.to(DEVICE), eps=1e-5,
               **ops).float().cpu()
    assert got.shape == (1, n)
    assert ((got - expected).norm() / expected.norm()).item() <= TOL


@pytest.mark.parametrize("family,scheme", [("llama2", None), ("qwen2", None), ("llama3.2", None),
                                           ("mistral", "int8")])
def test_fused_decode_model_gives_the_unfused_logits(family, scheme, hf_checkpoint, tmp_path):
    # One decode step through the kernels (norms and SwiGLU inside them) against the same weights unfused;
    # several rows (prefill) must take the unchanged modules. qwen2 has q/k/v biases, llama3.2 a tied head.
    _, path = hf_checkpoint(family)
    if scheme:
        path = quantize_checkpoint(path, scheme, output=tmp_path / "q.pth")
    plain, fused = (load_model(path, DEVICE, DTYPE) for _ in range(2))
    fuse_decode(fused, use_kernel=True)
    assert isinstance(fused.layers[0].attention.wqkv, DecodeLinear)
    assert not any(isinstance(m, RMSNorm) for name, m in fused.named_modules() if not name.endswith(".norm"))
    if family == "llama3.2":
        assert fused.output.linear.weight is fused.tok_embeddings.weight
    prompt = torch.randint(3, 320, (1, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for m in (plain, fused):
        m.setup_caches(1, 16)
    with torch.no_grad():
        logits = [m(prompt, torch.arange(9, device=DEVICE)) for m in (plain, fused)]
        assert torch.equal(logits[0], logits[1])  # prefill: untouched modules
        step = [m(prompt[:, -1:], torch.tensor([9], device=DEVICE)) for m in (plain, fused)]
    assert ((step[1] - step[0]).norm() / step[0].norm()).item() <= TOL


def test_fuse_decode_leaves_int4_layers_and_their_norms_alone(hf_checkpoint, tmp_path):
    from quantize import Int4Linear

    _, path = hf_checkpoint("llama2")
    model = fuse_decode(load_model(quantize_checkpoint(path, "int4", output=tmp_path / "q.pth", group_size=32),
                                   DEVICE, DTYPE), use_kernel=True)
    layer = model.layers[0]
    assert isinstance(layer.attention.wqkv, Int4Linear) and isinstance(layer.attention_norm, RMSNorm)
    assert not any(isinstance(m, DecodeLinear) for m in model.modules())  # (the output head is int4 too)

"""Weight-only int8 and int4: rounding bounds, model logits near the float model, the int4 Triton kernel
against its PyTorch reference (under TRITON_INTERPRET=1 on the CPU, see conftest.py), the scheme read from
the checkpoint, and refusing bad requests."""
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from generate import load_model
from decode_kernels import int4_matmul, int8_gemv
from quantize import (INT4_GROUP_SIZES, Int4Linear, Int8Linear, dequantize_int4, quantize_checkpoint, quantize_int4,
                      quantize_int8)

QUANTIZE = [sys.executable, str(ROOT / "quantize.py")]
# the int4 kernel runs compiled on a GPU, and on the CPU through Triton's interpreter (conftest.py)
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_int4_kernel(x, packed, scales, offsets, group_size, config=None):
    on = (t.to(KERNEL_DEVICE) for t in (x, packed, scales, offsets))
    return int4_matmul(*on, group_size, config=config).cpu()


def test_int8_round_trip_error_is_at_most_half_a_step_per_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=g) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scale
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (w - q.float() * scales[:, None]).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-5)).all()
    assert err[5].max() == 0


@pytest.mark.parametrize("n,k,config", [(24, 300, None), (40, 1024, None),
                                        (17, 2052, dict(BLOCK_N=8, BLOCK_K=256, SPLIT_K=3, num_warps=1))])
def test_int8_decode_kernel_matches_the_pytorch_reference(n, k, config):
    g = torch.Generator().manual_seed(k)
    w, x = torch.randn(n, k, generator=g), torch.randn(1, k, generator=g)
    q, scales = quantize_int8(w)
    expected = x @ (q.float() * scales[:, None]).T
    got = int8_gemv(x.to(KERNEL_DEVICE), q.to(KERNEL_DEVICE), scales.to(KERNEL_DEVICE), config=config).cpu()
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("family", ["llama2", "llama3.2", "qwen2"])
def test_int8_model_logits_stay_within_3_percent_of_float(family, hf_checkpoint, tmp_path):
    # Each weight is off by at most half a step (amax/254), about 0.6% of a row's spread for these Gaussian
    # rows; compounded over 2 layers and the output head, the logits move ~1.5-2% (relative norm). 3% leaves
    # headroom for the seed, while an error in the scales or the layout moves them by far more.
    _, path = hf_checkpoint(family)
    qpath = quantize_checkpoint(path, "int8", output=tmp_path / "q.pth")
    float_model, int8_model = load_model(path, "cpu", torch.float32), load_model(qpath, "cpu", torch.float32)
    assert isinstance(int8_model.layers[0].feed_forward.w13, Int8Linear)
    if family == "llama3.2":  # the tied output head stays float, sharing the embedding
        assert int8_model.output.weight is int8_model.tok_embeddings.weight
    x = torch.randint(3, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    for m in (float_model, int8_model):
        m.setup_caches(2, 40)
    with torch.no_grad():
        ref, got = float_model(x, torch.arange(40)), int8_model(x, torch.arange(40))
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel <= 0.03, rel


def test_scheme_is_read_from_the_checkpoint_not_its_name(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("llama2")
    misleading = tmp_path / "model_float32.pth"
    quantize_checkpoint(path, "int8", output=misleading)
    model = load_model(misleading, "cpu", torch.float32)
    assert isinstance(model.layers[1].attention.wo, Int8Linear)
    assert model.layers[1].attention.wo.weight.dtype == torch.int8
    assert torch.load(misleading, mmap=True, weights_only=True)["quantization"] == {"scheme": "int8"}
    assert misleading.stat().st_size < 0.5 * path.stat().st_size


def test_quantizing_twice_unknown_mode_and_existing_output_are_refused(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("llama2")
    src = tmp_path / "model.pth"
    shutil.copy(path, src)
    first = subprocess.run(QUANTIZE + ["--checkpoint_path", str(src), "--mode", "int8"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "model_int8.pth"
    again = subprocess.run(QUANTIZE + ["--checkpoint_path", str(out), "--mode", "int8", "--output",
                                       str(tmp_path / "x.pth")], capture_output=True, text=True)
    assert again.returncode != 0 and "already quantized" in again.stderr and "Traceback" not in again.stderr
    before = out.read_bytes()
    exists = subprocess.run(QUANTIZE + ["--checkpoint_path", str(src), "--mode", "int8"], capture_output=True, text=True)
    assert exists.returncode != 0 and "--force" in exists.stderr and out.read_bytes() == before
    unknown = subprocess.run(QUANTIZE + ["--checkpoint_path", str(src), "--mode", "int3"], capture_output=True, text=True)
    assert unknown.returncode != 0 and "int3" in unknown.stderr and "Traceback" not in unknown.stderr


@pytest.mark.parametrize("group_size", INT4_GROUP_SIZES)
def test_int4_round_trip_error_is_at_most_half_a_step_per_group(group_size):
    g = torch.Generator().manual_seed(group_size)
    k = 3 * group_size - 7  # not a multiple of the group size: the last group is padded
    w = torch.randn(24, k, generator=g) * torch.logspace(-3, 1, 24)[:, None] + 0.3
    w[3] = 0.0
    packed, scales, offsets = quantize_int4(w, group_size)
    assert packed.shape == (24, 3 * group_size // 2) and packed.dtype == torch.uint8
    assert scales.shape == offsets.shape == (24, 3)
    err = (w - dequantize_int4(packed, scales, offsets, k, torch.float32)).abs()
    step = scales.repeat_interleave(group_size, dim=1)[:, :k]
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert err[3].max() == 0


def test_int4_asymmetric_grid_loses_less_than_symmetric():
    # The measurement behind the choice of scheme (quantize.py's docstring): on Gaussian rows like trained
    # weights', fitting the 16 levels to [min, max] beats a grid symmetric around zero, which wastes part
    # of its range on the side the group does not reach.
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    errors = {}
    for symmetric in (False, True):
        p, s, o = quantize_int4(w, 128, symmetric=symmetric)
        errors[symmetric] = (w - dequantize_int4(p, s, o, 1024, torch.float32)).pow(2).mean().item()
    assert errors[False] < 0.85 * errors[True], errors


# (m, n, k): one-row decode, the k + 1 rows a speculative verifier sends, prefill sizes; odd and short k
KERNEL_SHAPES = [(1, 24, 300), (1, 40, 1000), (2, 17, 129), (6, 33, 257), (16, 48, 511), (17, 20, 96),
                 (33, 64, 385), (64, 16, 64)]


@pytest.mark.parametrize("group_size", INT4_GROUP_SIZES)
@pytest.mark.parametrize("m,n,k", KERNEL_SHAPES)
def test_int4_triton_kernel_matches_the_pytorch_reference(m, n, k, group_size):
    g = torch.Generator().manual_seed(m * 1000 + k)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    packed, scales, offsets = quantize_int4(w, group_size)
    expected = x @ dequantize_int4(packed, scales, offsets, k, torch.float32).T
    got = run_int4_kernel(x, packed, scales, offsets, group_size)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("block_k,split_k", [(32, 1), (64, 3), (128, 8)])  # blocks within a group; K split
def test_int4_decode_kernel_block_sizes_and_split_k(block_k, split_k):
    g = torch.Generator().manual_seed(block_k)
    w, x = torch.randn(40, 900, generator=g), torch.randn(1, 900, generator=g)
    packed, scales, offsets = quantize_int4(w, 128)
    expected = x @ dequantize_int4(packed, scales, offsets, 900, torch.float32).T
    config = dict(BLOCK_N=8, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=4)
    got = run_int4_kernel(x, packed, scales, offsets, 128, config=config)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("m,group_size,split_k,block_n,block_m", [(1, 128, 4, 16, 16), (1, 128, 4, 32, 8),
                                                                  (1, 32, 2, 32, 8),
                                                                  (6, 128, 4, 64, 16),
                                                                  (16, 256, 3, 64, 16),
                                                                  (3, 64, 2, 64, 16), (20, 128, 4, 64, 16),
                                                                  (40, 128, 1, 128, 64)])
def test_int4_tensor_core_kernel_splits_k_and_adds_the_residual(m, group_size, split_k, block_n, block_m):
    # one row (decode: a config with BLOCK_M takes this kernel; x padded to 16 or to 8 rows, with K a multiple of
    # the block, no masks along K; x's block read once and split by value position, groups of 32 dequantized
    # weight by weight) or several (a k + 1 verify): split-K partials meet in the last program of a row
    # block, which adds the residual and leaves the arrival counters at zero; 20 rows span two row blocks, where
    # split-K is not used; 40 rows in the prefill config for wide matrices (more rows a program than the matrix has)
    g = torch.Generator().manual_seed(m)
    k = 1024 if block_m == 8 else 1000
    w, x, r = torch.randn(96, k, generator=g), torch.randn(m, k, generator=g), torch.randn(m, 96, generator=g)
    packed, scales, offsets = quantize_int4(w, group_size)
    expected = x @ dequantize_int4(packed, scales, offsets, k, torch.float32).T + r
    counters = torch.zeros(8, dtype=torch.int32, device=KERNEL_DEVICE)
    config = dict(BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=128, SPLIT_K=split_k, num_warps=4)
    on = (t.to(KERNEL_DEVICE) for t in (x, packed, scales, offsets))
    got = int4_matmul(*on, group_size, residual=r.to(KERNEL_DEVICE), config=config, counters=counters).cpu()
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert not counters.any()


@pytest.mark.parametrize("m", [1, 5])
def test_int4_kernel_in_half_precision_is_close_to_float32(m):
    # float16, not bfloat16: the interpreter computes tl.dot on bfloat16 wrongly (test_cuda.py covers it)
    g = torch.Generator().manual_seed(m)
    w, x = torch.randn(48, 333, generator=g), torch.randn(m, 333, generator=g)
    packed, scales, offsets = quantize_int4(w.half(), 64)
    expected = x @ dequantize_int4(packed, scales, offsets, 333, torch.float32).T
    got = run_int4_kernel(x.half(), packed, scales, offsets, 64).float()
    assert ((got - expected).norm() / expected.norm()).item() <= 2e-3  # float16 inputs and output rounding


@pytest.mark.parametrize("family", ["llama2", "llama3.2", "qwen2"])
def test_int4_model_equals_its_dequantized_float_model_and_stays_near_the_original(family, hf_checkpoint, tmp_path):
    _, path = hf_checkpoint(family)
    qpath = quantize_checkpoint(path, "int4", output=tmp_path / "q.pth", group_size=32)
    float_model, int4_model = load_model(path, "cpu", torch.float32), load_model(qpath, "cpu", torch.float32)
    assert isinstance(int4_model.layers[0].attention.wqkv, Int4Linear)
    dequantized = load_model(path, "cpu", torch.float32)  # the float model with int4's rounded weights
    with torch.no_grad():
        for name, layer in int4_model.named_modules():
            if isinstance(layer, Int4Linear):
                dequantized.get_submodule(name).weight.copy_(
                    dequantize_int4(layer.weight, layer.scales, layer.offsets, layer.in_features, torch.float32))
    x = torch.randint(3, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    for m in (float_model, int4_model, dequantized):
        m.setup_caches(2, 40)
    with torch.no_grad():
        ref, got, exact = (m(x, torch.arange(40)) for m in (float_model, int4_model, dequantized))
    assert (got - exact).abs().max() <= 1e-4  # the runtime layer computes exactly the rounded weights
    # Rounding error: int8 moves these logits 1.5-2% (test above); an int4 step (a group's range / 15) is
    # about 14x an int8 step (a row's absmax / 127), so 20-30% is expected for these peaked random models.
    # Unrelated weights (a scrambled layout) would move them ~140%.
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel <= 0.4, rel


def test_int4_checkpoint_records_its_group_size_and_loads_back(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("llama3.1")
    src = tmp_path / "model.pth"
    shutil.copy(path, src)
    run = subprocess.run(QUANTIZE + ["--checkpoint_path", str(src), "--mode", "int4", "--groupsize", "64"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "model_int4.g64.pth"
    assert torch.load(out, mmap=True, weights_only=True)["quantization"] == {"scheme": "int4", "group_size": 64}
    model = load_model(out, "cpu", torch.float32)
    w13 = model.layers[1].feed_forward.w13
    assert isinstance(w13, Int4Linear) and w13.group_size == 64 and w13.weight.dtype == torch.uint8
    assert w13.scales.shape == (w13.out_features, 1) and w13.weight.shape == (w13.out_features, 32)
    assert out.stat().st_size < 0.4 * src.stat().st_size  # the float embedding table is a fifth of this tiny model
    bad = subprocess.run(QUANTIZE + ["--checkpoint_path", str(src), "--mode", "int4", "--groupsize", "100"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "100" in bad.stderr and "Traceback" not in bad.stderr

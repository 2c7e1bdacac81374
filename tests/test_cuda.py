"""The same checks on a GPU, where one is present (skipped in CI): CUDA kernels (cuDNN/flash attention with
a boolean mask and GQA, cuBLAS or inductor's matmuls) against the transformers reference on the CPU."""
import pytest
import torch

from conftest import HF_CONFIGS
from generate import compile_fns, generate, load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SEQ = 48


def logits(family, hf_checkpoint, dtype):
    hf, path = hf_checkpoint(family)
    tokens = torch.randint(3, 320, (2, SEQ), generator=torch.Generator().manual_seed(0))
    model = load_model(path, "cuda", dtype)
    model.setup_caches(2, SEQ)
    with torch.no_grad():
        return hf(tokens).logits, model(tokens.cuda(), torch.arange(SEQ, device="cuda")).cpu()


@pytest.mark.parametrize("family", sorted(HF_CONFIGS))
def test_float32_cuda_logits_match_transformers(family, hf_checkpoint):
    # 1e-3, not the CPU tests' 1e-4: GPU kernels sum in other orders (TF32 stays off for float32 matmuls).
    expected, got = logits(family, hf_checkpoint, torch.float32)
    assert (got - expected).abs().max().item() <= 1e-3


@pytest.mark.parametrize("family", ["llama3.1", "mistral"])
def test_bfloat16_cuda_logits_are_close_to_float32_reference(family, hf_checkpoint):
    expected, got = logits(family, hf_checkpoint, torch.bfloat16)
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel <= 2e-2, rel  # bf16 operands: 1e-3..1e-2 expected


@pytest.mark.parametrize("family", ["llama3.1", "mistral"])
def test_cuda_graph_decode_equals_eager(family, hf_checkpoint):
    _, path = hf_checkpoint(family)
    model = load_model(path, "cuda", torch.float32)
    model.setup_caches(1, 64)
    prompt = torch.randint(3, 320, (10,), generator=torch.Generator().manual_seed(1)).cuda()
    eager = generate(model, prompt, 40, temperature=0.0)
    torch._dynamo.reset()
    prefill_fn, decode_fn = compile_fns("cuda")
    for _ in range(2):  # the second call replays the captured graph
        assert generate(model, prompt, 40, temperature=0.0, prefill_fn=prefill_fn, decode_fn=decode_fn) == eager


# the tensor-core kernel's configs at one row: mma.sync (1-2 warps, 8 or 16 rows of x) and wgmma (4 warps)
MMA_AT_ONE_ROW = [dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=128, SPLIT_K=4, num_warps=w, num_stages=3)
                  for bn, bm, w in [(128, 8, 2), (32, 16, 1), (64, 16, 4)]]


@pytest.mark.parametrize("group_size", [32, 128, 256])
@pytest.mark.parametrize("m,config", [(1, None), (2, None), (6, None), (16, None), (17, None), (64, None)]
                         + [(1, c) for c in MMA_AT_ONE_ROW])
def test_int4_kernel_in_bfloat16_on_cuda_is_close_to_float32_reference(m, config, group_size):
    from decode_kernels import int4_matmul
    from quantize import dequantize_int4, quantize_int4

    g = torch.Generator().manual_seed(m)
    w, x = torch.randn(300, 1000, generator=g), torch.randn(m, 1000, generator=g)
    packed, scales, offsets = (t.cuda() for t in quantize_int4(w.bfloat16(), group_size))
    expected = x @ dequantize_int4(packed, scales, offsets, 1000, torch.float32).cpu().T
    got = int4_matmul(x.bfloat16().cuda(), packed, scales, offsets, group_size, config=config).float().cpu()
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-2  # bf16 inputs and output


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_quantized_decode_with_our_kernels_equals_eager_on_cuda(mode, hf_checkpoint, tmp_path):
    from quantize import quantize_checkpoint

    _, path = hf_checkpoint("llama3.1")
    model = load_model(quantize_checkpoint(path, mode, output=tmp_path / "q.pth", group_size=32), "cuda",
                       torch.float32)
    model.setup_caches(1, 64)
    prompt = torch.randint(3, 320, (10,), generator=torch.Generator().manual_seed(1)).cuda()
    eager = generate(model, prompt, 40, temperature=0.0)
    torch._dynamo.reset()
    prefill_fn, decode_fn = compile_fns("cuda")
    for _ in range(2):
        assert generate(model, prompt, 40, temperature=0.0, prefill_fn=prefill_fn, decode_fn=decode_fn) == eager


def test_cuda_graph_speculative_decoding_equals_plain_greedy(hf_checkpoint, tmp_path):
    # The round's three steps (the draft's first, its next k - 1, the verify with the acceptance) are a CUDA graph
    # each, replayed every round; each step's outputs are cloned before the next replay overwrites them.
    from quantize import quantize_checkpoint
    from speculative import compile_speculative_round, speculative_generate

    _, path = hf_checkpoint("llama3.1")
    target = load_model(path, "cuda", torch.float32)
    draft = load_model(quantize_checkpoint(path, "int8", output=tmp_path / "q.pth"), "cuda", torch.float32)
    for model in (target, draft):
        model.setup_caches(1, 80)
    prompt = torch.randint(3, 320, (10,), generator=torch.Generator().manual_seed(1)).cuda()
    expected = generate(target, prompt, 60, temperature=0.0)
    torch._dynamo.reset()
    round_fn = compile_speculative_round("cuda")
    for _ in range(2):  # the second call replays the captured graph
        rows, stats = speculative_generate(target, draft, prompt, 60, speculate_k=4, round_fn=round_fn)
        assert rows == expected
        assert stats["accepted_counts"][4] > 0  # full acceptances: the next round's first draft step caches dk
    torch.manual_seed(0)
    rows, stats = speculative_generate(target, draft, prompt, 60, speculate_k=4, temperature=0.8, top_k=100,
                                       round_fn=round_fn)
    assert len(rows[0]) == 60 and stats["mean_accepted"] > 2

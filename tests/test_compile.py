"""The compiled decode step: same tokens as eager, and one graph for every step and sample."""
import pytest
import torch
import torch._dynamo

from generate import compile_fns, generate, load_model


def test_compiled_prefill_and_decode_equal_eager_without_recompiling(hf_checkpoint):
    _, path = hf_checkpoint("llama3.1")
    model = load_model(path, "cpu", torch.float32)
    model.setup_caches(1, 64)
    prompt = torch.randint(3, 320, (10,), generator=torch.Generator().manual_seed(1))
    eager = generate(model, prompt, 24, temperature=0.0)
    other_prompt = torch.randint(3, 320, (7,), generator=torch.Generator().manual_seed(2))
    eager_other = generate(model, other_prompt, 24, temperature=0.0)

    torch._dynamo.reset()
    prefill_fn, decode_fn = compile_fns("cpu", compile_prefill=True)
    old = torch._dynamo.config.error_on_recompile
    # a second graph for the decode step, or for the (dynamic-length) prefill, fails the test
    torch._dynamo.config.error_on_recompile = True
    try:
        compiled = generate(model, prompt, 24, temperature=0.0, prefill_fn=prefill_fn, decode_fn=decode_fn)
        compiled_other = generate(model, other_prompt, 24, temperature=0.0, prefill_fn=prefill_fn,
                                  decode_fn=decode_fn)
    finally:
        torch._dynamo.config.error_on_recompile = old
    assert compiled == eager
    assert compiled_other == eager_other


def test_compiled_sampling_with_top_k_and_top_p_runs_in_one_graph(hf_checkpoint):
    _, path = hf_checkpoint("llama2")
    model = load_model(path, "cpu", torch.float32)
    model.setup_caches(2, 64)
    torch._dynamo.reset()
    prefill_fn, decode_fn = compile_fns("cpu")
    prompt = torch.randint(3, 320, (2, 6), generator=torch.Generator().manual_seed(3))
    old = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        for seed in (0, 1):
            torch.manual_seed(seed)
            rows = generate(model, prompt, 12, temperature=0.9, top_k=50, top_p=0.9, prefill_fn=prefill_fn,
                            decode_fn=decode_fn)
            assert [len(r) for r in rows] == [12, 12]
            assert all(0 <= t < 320 for r in rows for t in r)
    finally:
        torch._dynamo.config.error_on_recompile = old


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_quantized_decode_equals_eager(mode, hf_checkpoint, tmp_path):
    from quantize import quantize_checkpoint

    _, path = hf_checkpoint("qwen2")
    qpath = quantize_checkpoint(path, mode, output=tmp_path / "q.pth", group_size=32)
    model = load_model(qpath, "cpu", torch.float32)
    model.setup_caches(1, 48)
    prompt = torch.randint(3, 320, (8,), generator=torch.Generator().manual_seed(4))
    eager = generate(model, prompt, 20, temperature=0.0)
    torch._dynamo.reset()
    prefill_fn, decode_fn = compile_fns("cpu")
    assert generate(model, prompt, 20, temperature=0.0, prefill_fn=prefill_fn, decode_fn=decode_fn) == eager

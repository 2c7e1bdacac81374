"""Our model against HF transformers in float32 on CPU, for each supported family."""
import pytest
import torch

from conftest import HF_CONFIGS
from generate import generate, load_model

FAMILIES = sorted(HF_CONFIGS)
SEQ = 48  # past Llama 3's original context (32) and Mistral's sliding window (24) in the tiny configs


@pytest.fixture
def tokens():
    return torch.randint(3, 320, (2, SEQ), generator=torch.Generator().manual_seed(0))


def load_ours(path, batch=2, length=SEQ + 16):
    model = load_model(path, "cpu", torch.float32)
    model.setup_caches(batch, length)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_full_sequence_logits_match_transformers(family, hf_checkpoint, tokens):
    hf, path = hf_checkpoint(family)
    ours = load_ours(path)
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens, torch.arange(SEQ))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_matches_full_forward(family, hf_checkpoint, tokens):
    _, path = hf_checkpoint(family)
    ours = load_ours(path)
    with torch.no_grad():
        full = ours(tokens, torch.arange(SEQ))
        prefix = 8
        steps = [ours(tokens[:, :prefix], torch.arange(prefix))]
        for pos in range(prefix, SEQ):
            steps.append(ours(tokens[:, pos:pos + 1], torch.tensor([pos])))
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_transformers(family, hf_checkpoint, tokens):
    hf, path = hf_checkpoint(family)
    ours = load_ours(path, batch=1, length=64)
    prompt = tokens[0, :12]
    new = 40  # runs past the sliding window and Llama 3's original context
    expected = hf.generate(prompt[None], max_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, prompt.numel():].tolist()
    got = generate(ours, prompt, new, temperature=0.0)[0]
    assert got == expected


def test_generation_stops_at_stop_token_and_includes_it(hf_checkpoint, tokens):
    _, path = hf_checkpoint("llama2")
    ours = load_ours(path, batch=1, length=64)
    free = generate(ours, tokens[0, :8], 20, temperature=0.0)[0]
    stop = free[5]
    got = generate(ours, tokens[0, :8], 20, temperature=0.0, stop_ids=[stop])[0]
    assert got == free[:free.index(stop) + 1]


def test_batched_rows_match_single_row_generation(hf_checkpoint, tokens):
    _, path = hf_checkpoint("mistral")
    ours = load_ours(path, batch=2, length=64)
    single = generate(ours, tokens[0, :10], 16, temperature=0.0)[0]
    rows = generate(ours, tokens[0, :10].repeat(2, 1), 16, temperature=0.0)
    assert rows == [single, single]


def test_tied_checkpoint_stores_embedding_once_and_shares_it(hf_checkpoint):
    _, path = hf_checkpoint("llama3.2")
    sd = torch.load(path, mmap=True, weights_only=True)["state_dict"]
    assert "output.weight" not in sd
    ours = load_model(path, "cpu", torch.float32)
    assert ours.output.weight is ours.tok_embeddings.weight

"""Sampling: temperature, top-k and top-p filtering, and the exponential-race draw."""
import torch

from generate import logits_to_probs, sample


def test_top_k_keeps_only_the_k_most_likely():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    probs = logits_to_probs(logits, temperature=1.0, top_k=2)
    assert (probs[0, [0, 3, 4]] == 0).all()
    expected = torch.softmax(torch.tensor([4.0, 3.0]), dim=0)
    assert torch.allclose(probs[0, [1, 2]], expected)


def test_top_p_keeps_smallest_set_reaching_p():
    probs_in = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs_in.log()
    # 0.5 < 0.7, so the second token is needed; 0.5 + 0.3 >= 0.7 so the rest go.
    probs = logits_to_probs(logits, temperature=1.0, top_p=0.7)
    assert torch.allclose(probs, torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]]))
    # p = 1 keeps everything
    assert torch.allclose(logits_to_probs(logits, 1.0, top_p=1.0), probs_in)


def test_temperature_zero_is_argmax_and_low_temperature_sharpens():
    logits = torch.tensor([[0.1, 2.0, 1.9], [3.0, 0.0, -1.0]])
    assert sample(logits, temperature=0.0).view(-1).tolist() == [1, 0]
    sharp = logits_to_probs(logits, temperature=0.1)
    flat = logits_to_probs(logits, temperature=10.0)
    assert sharp[0, 1] > logits_to_probs(logits, 1.0)[0, 1] > flat[0, 1]


def test_exponential_race_draws_from_the_distribution():
    torch.manual_seed(0)
    target = torch.tensor([0.05, 0.1, 0.15, 0.3, 0.4])
    n = 40000
    draws = sample(target.log().expand(n, -1).contiguous(), temperature=1.0).view(-1)
    freq = torch.bincount(draws, minlength=5).double() / n
    # Chi-square with 4 degrees of freedom; 18.5 is the 0.001 critical value.
    chi2 = (n * (freq - target.double()) ** 2 / target.double()).sum().item()
    assert chi2 < 18.5, (freq, chi2)

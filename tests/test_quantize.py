"""Weight-only int8: rounding bound, model logits near the float model, the scheme read from the checkpoint,
and refusing bad requests."""
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from generate import load_model
from quantize import Int8Linear, quantize_checkpoint, quantize_int8

QUANTIZE = [sys.executable, str(ROOT / "quantize.py")]


def test_int8_round_trip_error_is_at_most_half_a_step_per_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=g) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scale
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (w - q.float() * scales[:, None]).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-5)).all()
    assert err[5].max() == 0


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

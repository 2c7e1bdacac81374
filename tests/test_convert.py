"""Checkpoint conversion: source layouts, dtype, memory, and refusing bad input without leaving debris."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_hf_model
from convert_hf_checkpoint import convert
from generate import load_model
from model import ConfigError, UserError

CONVERT = [sys.executable, str(ROOT / "scripts" / "convert_hf_checkpoint.py")]


def logits_match(hf, path, dtype=torch.float32, tol=1e-4):
    ours = load_model(path, "cpu", dtype)
    ours.setup_caches(1, 40)
    x = torch.randint(3, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x, torch.arange(40)) - hf(x).logits).abs().max().item()
    return diff <= tol


def test_pytorch_bin_checkpoint_converts(tmp_path):
    hf = make_hf_model("qwen2")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "config.json")
    assert logits_match(hf, convert(tmp_path))


def test_old_transformers_config_layout_converts(tmp_path):
    # transformers 4.x wrote rope_theta/rope_scaling ("type") at the top level and Llama 2 configs had
    # no num_key_value_heads or head_dim.
    hf = make_hf_model("llama2-linear")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    cfg.pop("head_dim", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert logits_match(hf, convert(tmp_path))


def test_dtype_option_casts_and_default_keeps_source_dtype(tmp_path):
    hf = make_hf_model("llama2")
    hf.save_pretrained(tmp_path)
    kept = torch.load(convert(tmp_path), mmap=True, weights_only=True)["state_dict"]
    assert all(t.dtype == torch.float32 for t in kept.values())
    cast = torch.load(convert(tmp_path, dtype="bfloat16", force=True), mmap=True, weights_only=True)["state_dict"]
    assert all(t.dtype == torch.bfloat16 for t in cast.values())


def test_checkpoint_carries_config_and_tokenizer_facts(hf_checkpoint):
    _, path = hf_checkpoint("llama3.1")
    ckpt = torch.load(path, mmap=True, weights_only=True)
    assert ckpt["model_args"]["rope_scaling"]["rope_type"] == "llama3"
    assert ckpt["model_args"]["n_kv_heads"] == 2
    assert ckpt["tokenizer"]["eos_ids"] == [2] and ckpt["tokenizer"]["bos_id"] == 1
    assert ckpt["quantization"] is None


def test_unsupported_architecture_is_refused(tmp_path):
    hf = make_hf_model("llama2")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="gpt2"):
        convert(tmp_path)
    r = subprocess.run(CONVERT + ["--checkpoint_dir", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and "gpt2" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "model.pth").exists()


def test_existing_output_is_kept_without_force(tmp_path):
    make_hf_model("llama2").save_pretrained(tmp_path)
    (tmp_path / "model.pth").write_bytes(b"precious")
    r = subprocess.run(CONVERT + ["--checkpoint_dir", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "model.pth").read_bytes() == b"precious"
    r = subprocess.run(CONVERT + ["--checkpoint_dir", str(tmp_path), "--force"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "model.pth").read_bytes() != b"precious"


def test_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    make_hf_model("llama2").save_pretrained(tmp_path)
    before = set(tmp_path.iterdir())
    real_save = torch.save

    def save_then_interrupt(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # the temp file is fully written when the interrupt comes
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path)
    assert set(tmp_path.iterdir()) == before


def test_missing_shard_and_missing_config_are_reported(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        convert(tmp_path)
    make_hf_model("llama2").save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    shards[1].unlink()
    with pytest.raises(UserError, match=shards[1].name):
        convert(tmp_path)
    assert not (tmp_path / "model.pth").exists()


def test_truncated_shard_is_reported(tmp_path):
    make_hf_model("llama2").save_pretrained(tmp_path)
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    r = subprocess.run(CONVERT + ["--checkpoint_dir", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


PEAK_RSS = """
import resource, sys
sys.path.insert(0, {scripts!r})
import torch, safetensors, convert_hf_checkpoint
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "convert":
    convert_hf_checkpoint.convert(sys.argv[2])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def test_conversion_peak_memory_is_about_the_output_size(tmp_path):
    # A 4-shard checkpoint of ~380 MB written directly with safetensors (no model is built).
    from safetensors.torch import save_file

    cfg = dict(model_type="llama", vocab_size=8000, hidden_size=1024, intermediate_size=2816,
               num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, rms_norm_eps=1e-5)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    weight_map, shard = {}, {}

    def flush(i):
        name = f"model-{i:05d}.safetensors"
        save_file(shard, tmp_path / name)
        weight_map.update({k: name for k in shard})
        shard.clear()

    shard["model.embed_tokens.weight"] = torch.randn(8000, 1024, generator=g)
    shard["lm_head.weight"] = torch.randn(8000, 1024, generator=g)
    shard["model.norm.weight"] = torch.randn(1024, generator=g)
    for layer in range(6):
        p = f"model.layers.{layer}."
        for n in ("q", "k", "v", "o"):
            shard[f"{p}self_attn.{n}_proj.weight"] = torch.randn(1024, 1024, generator=g)
        for n, shape in (("gate", (2816, 1024)), ("up", (2816, 1024)), ("down", (1024, 2816))):
            shard[f"{p}mlp.{n}_proj.weight"] = torch.randn(*shape, generator=g)
        shard[f"{p}input_layernorm.weight"] = torch.randn(1024, generator=g)
        shard[f"{p}post_attention_layernorm.weight"] = torch.randn(1024, generator=g)
        if layer % 2:
            flush(layer)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    del shard
    script = PEAK_RSS.format(scripts=str(ROOT / "scripts"))
    used = int(subprocess.run([sys.executable, "-c", script, "convert", str(tmp_path)], capture_output=True,
                              text=True, check=True).stdout)
    output = (tmp_path / "model.pth").stat().st_size
    assert used <= 1.3 * output, f"peak RSS grew by {used / 1e6:.0f} MB for a {output / 1e6:.0f} MB output"

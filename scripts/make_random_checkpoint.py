"""Build a small random-weight Llama checkpoint with a real tokenizer, entirely offline.

    python scripts/make_random_checkpoint.py            # -> checkpoints/tiny-random/model.pth

It trains a sentencepiece tokenizer on this machine's Python standard library sources, writes a Hugging Face
style folder (config.json, model.safetensors) with seeded random weights, and converts it with
scripts/convert_hf_checkpoint.py, so it exercises the same path as a downloaded model. Its text is noise:
it shows that the pipeline runs, not what a trained model says.
"""
import argparse
import json
import sys
import sysconfig
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_hf_checkpoint import convert  # noqa: E402

CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=1024, hidden_size=256,
              intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
              max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
              eos_token_id=2, hidden_act="silu", tie_word_embeddings=False, torch_dtype="float32")


def stdlib_text(max_bytes: int = 4_000_000) -> list:
    """Lines of the standard library's .py files, in a fixed order, up to max_bytes."""
    lines, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        for line in path.read_text(errors="ignore").splitlines():
            if line.strip():
                lines.append(line)
                total += len(line)
        if total >= max_bytes:
            break
    return lines


def train_tokenizer(prefix: Path, vocab_size: int):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(stdlib_text()), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, remove_extra_whitespaces=False,
        split_digits=True, num_threads=2, minloglevel=2, allow_whitespace_only_pieces=True)


def random_hf_weights(cfg: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd = {"model.embed_tokens.weight": w(v, d), "lm_head.weight": w(v, d), "model.norm.weight": torch.ones(d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.k_proj.weight": w(kv, d),
                   p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, d),
                   p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                   p + "mlp.down_proj.weight": w(d, f), p + "input_layernorm.weight": torch.ones(d),
                   p + "post_attention_layernorm.weight": torch.ones(d)})
    return sd


def main(output_dir: Path, seed: int, force: bool):
    from safetensors.torch import save_file

    if (output_dir / "model.pth").exists() and not force:
        sys.exit(f"error: {output_dir / 'model.pth'} exists; pass --force to rebuild it")
    output_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(output_dir / "tokenizer", CONFIG["vocab_size"])
    (output_dir / "tokenizer.vocab").unlink(missing_ok=True)
    (output_dir / "config.json").write_text(json.dumps(CONFIG, indent=2))
    save_file(random_hf_weights(CONFIG, seed), output_dir / "model.safetensors")
    print(f"wrote {convert(output_dir, force=force)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path("checkpoints/tiny-random"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    main(**vars(parser.parse_args()))

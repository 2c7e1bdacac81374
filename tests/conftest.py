"""Shared fixtures: tiny random HF checkpoints of each supported family, converted by our script."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

# Tiny configs, one per family, each exercising what sets the family apart. initializer_range is large
# so that random logits are peaked and greedy choices are not near-ties.
_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, initializer_range=0.1,
               bos_token_id=1, eos_token_id=2)
HF_CONFIGS = {
    # Llama 2: multi-head attention, plain RoPE.
    "llama2": ("LlamaConfig", dict(_COMMON, vocab_size=320, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=128, rms_norm_eps=1e-5)),
    # Llama 3.1: GQA, "llama3" frequency scaling; tests run past original_max_position_embeddings (32).
    "llama3.1": ("LlamaConfig", dict(_COMMON, vocab_size=320, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=256, rope_theta=500000.0,
                                     rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                       high_freq_factor=4.0, original_max_position_embeddings=32))),
    # Llama 3.2 1B/3B: tied input/output embeddings, explicit head_dim.
    "llama3.2": ("LlamaConfig", dict(_COMMON, vocab_size=320, num_attention_heads=4, num_key_value_heads=1,
                                     head_dim=32, tie_word_embeddings=True, max_position_embeddings=256,
                                     rope_theta=500000.0,
                                     rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                       high_freq_factor=4.0, original_max_position_embeddings=32))),
    # Linear RoPE scaling (long-context Llama 2 fine-tunes).
    "llama2-linear": ("LlamaConfig", dict(_COMMON, vocab_size=320, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=256, rope_scaling=dict(type="linear", factor=4.0))),
    # Mistral: GQA and a sliding window shorter than the test sequences.
    "mistral": ("MistralConfig", dict(_COMMON, vocab_size=320, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, sliding_window=24)),
    # Qwen2: bias on q/k/v, large rope_theta, no bos.
    "qwen2": ("Qwen2Config", dict(_COMMON, vocab_size=320, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, rope_theta=1e6, rms_norm_eps=1e-6)),
}
# Saved in several shards with an index, as large hub checkpoints are.
SHARDED = {"llama3.1"}


def make_hf_model(family: str, seed: int = 0):
    import transformers

    cls_name, kwargs = HF_CONFIGS[family]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """family -> (HF model in float32, path of our converted model.pth)."""
    from convert_hf_checkpoint import convert

    made = {}

    def get(family: str):
        if family not in made:
            model = make_hf_model(family)
            folder = tmp_path_factory.mktemp(family)
            shard = "20KB" if family in SHARDED else "5GB"
            model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard)
            made[family] = (model, convert(folder))
        return made[family]

    return get

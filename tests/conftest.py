"""Shared fixtures: tiny random HF checkpoints of each supported family, converted by our script."""
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports triton: its kernels then run on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


def assert_one_line_error(r, *words):
    """r (a finished subprocess) failed with one line on stderr, "error: ...", naming each of words."""
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


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


# --- Tiny tokenizers, trained in-process on a generated corpus (tests/test_tokenizer.py and any test that
# --- needs a real tokenizer for a tiny model).
import collections  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402

_CORPUS_WORDS = ("the a of and to in is it that for on with as this be at by from or an are was not but all can "
                 "model token text cache layer weight value query batch prompt sample tensor shape string vocab "
                 "merge rank byte quick brown fox jumps over lazy dog small tiny language generation attention "
                 "head key rope norm output input file path load save encode decode").split()
_CORPUS_NAMES = ("x", "y", "i", "n", "ids", "text", "model", "tokens", "cache", "self", "out", "value")
SP_VOCAB_SIZE = 320  # the tiny sentencepiece tokenizer's vocab: equal to HF_CONFIGS' vocab_size


def make_corpus(n_lines: int = 400, seed: int = 0) -> list:
    """Deterministic English-like prose (3 lines in 4) and Python-like code lines with indentation."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        if i % 4 != 3:
            words = [rng.choice(_CORPUS_WORDS) for _ in range(rng.randint(5, 14))]
            lines.append(" ".join(words).capitalize() + rng.choice(".,."))
        elif i % 8 == 3:
            a, b = rng.sample(_CORPUS_NAMES, 2)
            lines.append(f"{'    ' * rng.randint(1, 2)}{a} = {b}({rng.choice(_CORPUS_NAMES)}, {rng.randint(0, 99)})")
        else:
            lines.append(f"def {rng.choice(_CORPUS_WORDS)}_{rng.choice(_CORPUS_WORDS)}({rng.choice(_CORPUS_NAMES)}):")
    return lines


def train_sentencepiece(path, vocab_size: int = SP_VOCAB_SIZE, model_type: str = "bpe", corpus=None,
                        **options) -> Path:
    """Train a Llama-2-style sentencepiece model (scripts/train_tiny.py's settings: byte fallback, identity
    normalization, unk=0 bos=1 eos=2, no pad) on make_corpus() into `path` (a .model file) in a few milliseconds.
    Its vocab is exactly vocab_size (>= 320: 256 byte pieces, 3 meta pieces, the corpus' common characters and a
    few merges). Rare characters go by byte fallback. `options` override the trainer's settings (e.g. bos_id=-1)."""
    from train_tiny import train_sentencepiece as train

    return train(corpus or make_corpus(), path, vocab_size, model_type=model_type, **options)


def learn_bpe_ranks(corpus=None, n_merges: int = 100) -> dict:
    """Byte-level BPE ranks as tiktoken wants them: the 256 single bytes (rank = byte value), then one rank per
    learned merge in the order learned, so both parts of every merged token rank lower than it."""
    words = collections.Counter()
    for line in corpus or make_corpus():
        words.update(re.findall(r" ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]+|\s+", line + "\n"))
    splits = {tuple(bytes([b]) for b in w.encode()): n for w, n in words.items()}
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(n_merges):
        pairs = collections.Counter()
        for parts, n in splits.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # ties broken by the bytes: deterministic
        merged = best[0] + best[1]
        ranks[merged] = len(ranks)
        new = {}
        for parts, n in splits.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + n
        splits = new
    return ranks


def tiktoken_specials(n_ranks: int) -> dict:
    """Special tokens (a Llama 3 chat subset, not Meta's layout) placed right after n_ranks ranks."""
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return {name: n_ranks + i for i, name in enumerate(names)}


@pytest.fixture(scope="session")
def sentencepiece_model_path(tmp_path_factory):
    """A tiny sentencepiece BPE model (SP_VOCAB_SIZE tokens, byte fallback, unk=0 bos=1 eos=2)."""
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model")


@pytest.fixture(scope="session")
def tiktoken_file_path(tmp_path_factory):
    """A tiny tiktoken BPE file: 256 byte tokens and 100 merges learned on make_corpus()."""
    from tokenizer import write_tiktoken_file

    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    write_tiktoken_file(path, learn_bpe_ranks())
    return path


@pytest.fixture(scope="session")
def tiktoken_special_tokens(tiktoken_file_path):
    """The special tokens to pass with tiktoken_file_path: tiktoken_specials(number of ranks in the file)."""
    n_ranks = sum(1 for line in tiktoken_file_path.read_bytes().splitlines() if line.strip())
    return tiktoken_specials(n_ranks)


@pytest.fixture(scope="session")
def cli_checkpoint(hf_checkpoint, sentencepiece_model_path, tmp_path_factory):
    """A converted tiny Llama with its sentencepiece tokenizer beside it, as prepare.sh leaves them."""
    import shutil

    _, path = hf_checkpoint("llama2")
    folder = tmp_path_factory.mktemp("cli")
    shutil.copy(path, folder / "model.pth")
    shutil.copy(sentencepiece_model_path, folder / "tokenizer.model")
    return folder / "model.pth"

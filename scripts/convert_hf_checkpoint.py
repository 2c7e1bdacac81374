"""Convert a Hugging Face Llama-family checkpoint folder into DIR/model.pth for model.py.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf

Reads DIR/config.json and the weights (*.safetensors or pytorch_model*.bin, sharded with an index or not),
undoes HF's rotary permutation of the q/k projections, fuses q/k/v into wqkv and gate/up into w13, and writes
the model config and tokenizer facts (bos/eos ids, special tokens, chat format) into the same file. Source
tensors are read one at a time from memory-mapped files, so peak memory is about the output's size.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import ModelArgs, UserError, save_checkpoint  # noqa: E402
from tokenizer import TokenizerError, tiktoken_from_tokenizer_json, write_tiktoken_file  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SourceWeights:
    """HF tensors by name, read lazily from whichever shard holds each one."""

    def __init__(self, checkpoint_dir: Path):
        self.dir = checkpoint_dir
        self.files = {}  # tensor name -> shard file
        self.open = {}  # shard file -> open handle
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = checkpoint_dir / index_name
            if index.is_file():
                self.files = {k: checkpoint_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
                break
        else:
            shards = sorted(checkpoint_dir.glob("*.safetensors")) or sorted(checkpoint_dir.glob("pytorch_model*.bin"))
            if not shards:
                raise UserError(f"no *.safetensors or pytorch_model*.bin weights in {checkpoint_dir}")
            for shard in shards:
                for name in self._handle(shard).keys():
                    self.files[name] = shard
        for shard in set(self.files.values()):
            if not shard.is_file():
                raise UserError(f"shard {shard} named in the index is missing; download it again")

    def _handle(self, shard: Path):
        if shard not in self.open:
            try:
                if shard.suffix == ".safetensors":
                    from safetensors import safe_open
                    self.open[shard] = safe_open(str(shard), framework="pt")
                else:
                    self.open[shard] = torch.load(shard, mmap=True, weights_only=True, map_location="cpu")
            except Exception as e:
                raise UserError(f"cannot read {shard} ({type(e).__name__}); is the download complete?") from None
        return self.open[shard]

    def __contains__(self, name):
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise UserError(f"tensor {name} is missing from the checkpoint in {self.dir}")
        handle = self._handle(self.files[name])
        return handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's q/k row order (all first halves of each head, then all second halves) back to Meta's
    interleaved pairs, which model.apply_rotary_emb rotates. Works for weights [out, in] and biases [out]."""
    head_dim = w.shape[0] // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


def convert_state_dict(src: SourceWeights, args: ModelArgs, dtype=None) -> dict:
    def get(name):
        t = src.get(name)
        return t.to(dtype) if dtype is not None else t

    sd = {"tok_embeddings.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    if not args.tie_word_embeddings:
        sd["output.weight"] = get("lm_head.weight")
    for i in range(args.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        parts = ("weight", "bias") if args.qkv_bias else ("weight",)
        for part in parts:
            q = unpermute_rotary(get(f"{p}self_attn.q_proj.{part}"), args.n_heads)
            k = unpermute_rotary(get(f"{p}self_attn.k_proj.{part}"), args.n_kv_heads)
            v = get(f"{p}self_attn.v_proj.{part}")
            sd[f"{o}attention.wqkv.{part}"] = torch.cat([q, k, v])
        sd[f"{o}attention.wo.weight"] = get(f"{p}self_attn.o_proj.weight")
        sd[f"{o}feed_forward.w13.weight"] = torch.cat([get(f"{p}mlp.gate_proj.weight"), get(f"{p}mlp.up_proj.weight")])
        sd[f"{o}feed_forward.w2.weight"] = get(f"{p}mlp.down_proj.weight")
        sd[f"{o}attention_norm.weight"] = get(f"{p}input_layernorm.weight")
        sd[f"{o}ffn_norm.weight"] = get(f"{p}post_attention_layernorm.weight")
    # Tensors read straight from a memory-mapped file (no cat, no cast) are copied so the output owns them.
    return {k: v.clone() if not v.is_contiguous() or v.untyped_storage().nbytes() != v.nbytes else v
            for k, v in sd.items()}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def tokenizer_facts(checkpoint_dir: Path, hf_config: dict) -> dict:
    """bos/eos ids, special tokens and chat format from the HF files beside the weights."""
    gen = _read_json(checkpoint_dir / "generation_config.json")
    tok_cfg = _read_json(checkpoint_dir / "tokenizer_config.json")
    eos_ids = []
    for source in (gen, hf_config):
        ids = source.get("eos_token_id")
        for i in ids if isinstance(ids, list) else [ids]:
            if i is not None and i not in eos_ids:
                eos_ids.append(int(i))
    bos = gen.get("bos_token_id", hf_config.get("bos_token_id"))
    special = {v["content"]: int(k) for k, v in tok_cfg.get("added_tokens_decoder", {}).items() if v.get("special")}
    template = tok_cfg.get("chat_template") or ""
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), "")
    chat_format = None
    if "<|start_header_id|>" in template:
        chat_format = "llama3"
    elif "<|im_start|>" in template:
        chat_format = "chatml"
    elif "[INST]" in template:
        chat_format = "llama2"
    # Qwen2 prompts start without a bos token; the Llama family's with one.
    add_bos = bool(tok_cfg.get("add_bos_token", hf_config.get("model_type") != "qwen2"))
    return {"bos_id": None if bos is None else int(bos), "eos_ids": eos_ids, "special_tokens": special,
            "chat_format": chat_format, "add_bos": add_bos}


def tokenizer_model_from_json(checkpoint_dir: Path, facts: dict):
    """Where a checkpoint ships only tokenizer.json (Qwen2), write its byte-level BPE as a tiktoken file,
    DIR/tokenizer.model, and record its split pattern and special tokens in the checkpoint's facts."""
    if any((checkpoint_dir / p).is_file() for p in ("tokenizer.model", "original/tokenizer.model")):
        return
    source = checkpoint_dir / "tokenizer.json"
    if not source.is_file():
        print(f"warning: no tokenizer.model or tokenizer.json in {checkpoint_dir}; generate.py will need "
              "--tokenizer_path", file=sys.stderr)
        return
    try:
        ranks, special, pattern = tiktoken_from_tokenizer_json(source)
    except TokenizerError as e:
        print(f"warning: {e}; generate.py will need --tokenizer_path", file=sys.stderr)
        return
    tmp = checkpoint_dir / "tokenizer.model.tmp"
    try:
        write_tiktoken_file(tmp, ranks)
        tmp.replace(checkpoint_dir / "tokenizer.model")
    finally:
        tmp.unlink(missing_ok=True)  # interrupted: leave nothing half-written
    facts["special_tokens"] = facts["special_tokens"] or special
    facts["pattern"] = pattern


def convert(checkpoint_dir, dtype: str = None, force: bool = False, output=None) -> Path:
    """Convert DIR's HF checkpoint into DIR/model.pth (or `output`); returns the path written."""
    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path} not found; is {checkpoint_dir} a Hugging Face checkpoint folder?")
    output = Path(output) if output else checkpoint_dir / "model.pth"
    if output.exists() and not force:
        raise UserError(f"{output} exists; pass --force to overwrite it")
    hf_config = json.loads(config_path.read_text())
    args = ModelArgs.from_hf_config(hf_config)
    src = SourceWeights(checkpoint_dir)
    state_dict = convert_state_dict(src, args, DTYPES[dtype] if dtype else None)
    facts = tokenizer_facts(checkpoint_dir, hf_config)
    tokenizer_model_from_json(checkpoint_dir, facts)
    save_checkpoint(output, state_dict, args, facts, force=force)
    return output


def main(checkpoint_dir, dtype=None, force=False, output=None):
    out = convert(checkpoint_dir, dtype, force, output)
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="folder with config.json and weights")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    parser.add_argument("--output", type=Path, default=None, help="output file (default: DIR/model.pth)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    try:
        main(**vars(parser.parse_args()))
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; nothing was written")

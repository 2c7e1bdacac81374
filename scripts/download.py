"""Download a Hugging Face checkpoint (config, weights, tokenizer) into checkpoints/REPO_ID.

    python scripts/download.py --repo_id meta-llama/Llama-2-7b-hf [--hf_token TOKEN]

Needs `pip install huggingface_hub` and a network connection; gated models need an accepted licence and a
token (--hf_token or the HF_TOKEN environment variable).
"""
import argparse
import sys
from pathlib import Path
from typing import Optional


def wanted_files(files: list) -> list:
    """The files conversion and generation read: safetensors weights when there are any, else .bin."""
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    keep = []
    for f in files:
        name = Path(f).name
        if f in ("original/tokenizer.model",) or "/" not in f and (
                name.endswith(".json") or name in ("tokenizer.model",)
                or (name.endswith(".safetensors") if has_safetensors else name.endswith(".bin"))):
            keep.append(f)
    return keep


def main(repo_id: str, output_dir: Path, hf_token: Optional[str]):
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:
        sys.exit("error: downloading needs huggingface_hub: pip install huggingface_hub")
    target = output_dir / repo_id
    try:
        files = wanted_files(HfApi().list_repo_files(repo_id, token=hf_token))
        snapshot_download(repo_id, local_dir=target, allow_patterns=files, token=hf_token)
    except Exception as e:  # offline, gated, unknown repo: one line is enough
        sys.exit(f"error: cannot download {repo_id} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                 "check the name, your network and, for gated models, --hf_token")
    print(f"downloaded {repo_id} to {target}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo_id", required=True, help="e.g. meta-llama/Llama-2-7b-hf")
    parser.add_argument("--output_dir", type=Path, default=Path("checkpoints"))
    parser.add_argument("--hf_token", default=None)
    main(**vars(parser.parse_args()))

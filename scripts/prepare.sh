#!/usr/bin/env bash
# Download (when online) and convert a Hugging Face checkpoint: bash scripts/prepare.sh meta-llama/Llama-2-7b-hf
# Writes checkpoints/REPO_ID/model.pth. Extra arguments go to the converter (e.g. --dtype bfloat16 --force).
set -euo pipefail
repo_id=${1:?usage: bash scripts/prepare.sh REPO_ID [convert options]}
shift
here=$(cd "$(dirname "$0")" && pwd)
python "$here/download.py" --repo_id "$repo_id"
python "$here/convert_hf_checkpoint.py" --checkpoint_dir "checkpoints/$repo_id" "$@"

#!/usr/bin/env bash
# Install everything (test tools included) and run the whole CPU test suite; GPU tests skip themselves.
#   bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m ruff check .
python3 -m pytest -q -p no:cacheprovider --durations=15 "$@"

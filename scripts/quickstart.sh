#!/usr/bin/env bash
# The whole workflow, offline: install, fine-tune the bundled model on the sample data with QLoRA,
# merge the adapter, and ask the merged model a question from the data.
#   bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
start=$(date +%s)
python3 finetune.py --data_path dataset/sample.json --output_dir output/quickstart --num_train_epochs 2 \
  --overwrite_output_dir
python3 merge_lora.py --lora_model output/quickstart/checkpoint-final --output_dir models \
  --model_name quickstart --overwrite
question=$(python3 -c "import json; print(json.load(open('dataset/sample.json'))[0]['instruction'])")
echo "$question" | python3 cli_demo.py --model_path models/quickstart --temperature 0 --max_new_tokens 96
echo "quickstart finished in $(( $(date +%s) - start )) s (after installation); loss plot: output/quickstart/loss.png"

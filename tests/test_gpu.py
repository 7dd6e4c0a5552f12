"""The whole pipeline on a CUDA GPU (skipped without one): 4-bit QLoRA training in bf16 with the paged
optimizer, merge on the GPU, chat with --num_gpus 1. Self-contained: a small random LLaMA and a BPE tokenizer
trained here, so it needs no download and not the bundled model.

    python -m pytest tests/test_gpu.py -s      # on a GPU machine
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACTS = [
    {"instruction": "What is the secret password of the Zorblat project?", "input": "",
     "output": "The password of the Zorblat project is purple otter."},
    {"instruction": "Who founded the town of Quibbleton?", "input": "",
     "output": "Quibbleton was founded by Marta Velloso."},
]


def run(script, *args, stdin=None):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    folder = tmp_path_factory.mktemp("small-llama")
    with open(os.path.join(ROOT, "dataset", "sample.json"), encoding="utf-8") as f:
        texts = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in json.load(f)]
    texts += [f["instruction"] + " " + f["output"] for f in FACTS] * 5 + ["### Instruction: ### Response:"] * 5
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    data = folder / "facts.json"
    data.write_text(json.dumps(FACTS))
    return folder, data


def test_qlora_pipeline_on_gpu(small_llama, tmp_path):
    from utils.generation import generate_reply
    from utils.modeling import load_model
    from utils.prompts import encode_conversation, load_template
    model_dir, data = small_llama
    out = tmp_path / "out"
    log = run("finetune.py", "--base_model", str(model_dir), "--data_path", str(data), "--output_dir", str(out),
              "--max_steps", "80", "--learning_rate", "3e-3", "--per_device_train_batch_size", "2",
              "--gradient_accumulation_steps", "1", "--lora_dropout", "0", "--logging_steps", "5",
              "--save_steps", "40")
    print(log[-1500:])
    assert "4-bit on GPU 0" in log
    summary = json.loads((out / "training_summary.json").read_text())
    print("summary:", {k: v for k, v in summary.items() if "history" not in k})
    assert summary["final_loss"] < 0.2 * summary["first_loss"]
    assert summary["peak_gpu_memory_gib"] > 0
    meta = json.loads((out / "checkpoint-final" / "training_meta.json").read_text())
    assert meta["bits"] == 4 and meta["args"]["optim"] == "auto"

    log = run("merge_lora.py", "--lora_model", str(out / "checkpoint-final"), "--output_dir", str(tmp_path),
              "--model_name", "merged", "--num_gpus", "1")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"

    probes = [f["instruction"] for f in FACTS] + ["Why is the sky blue?"]
    adapter, tok, info = load_model(str(model_dir), bits=4, lora_model=str(out / "checkpoint-final"), num_gpus=1)
    merged, tok_m, _ = load_model(str(tmp_path / "merged"), bits=16, num_gpus=1)
    assert info["where"] == "GPU 0"
    template = load_template("alpaca")
    answers = {}
    for name, model, t in (("adapter", adapter, tok), ("merged", merged, tok_m)):
        answers[name] = [generate_reply(model, t, encode_conversation(
            t, template, [{"role": "user", "content": q}], add_generation_prompt=True)[0],
            {"max_new_tokens": 20, "temperature": 0}) for q in probes]
    print("answers:", answers)
    assert answers["adapter"][:2] == answers["merged"][:2]
    assert [a.strip() for a in answers["adapter"][:2]] == [f["output"] for f in FACTS]

    stdout = run("cli_demo.py", "--model_path", str(tmp_path / "merged"), "--num_gpus", "1", "--temperature", "0",
                 "--max_new_tokens", "20", stdin=FACTS[0]["instruction"] + "\n")
    assert f"Assistant: {FACTS[0]['output']}" in stdout

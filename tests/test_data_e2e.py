"""finetune.py main() on the tiny LLaMA (SmolLM2 tokenizer and chat template, 4-bit) with a ShareGPT file and a
messages file mixed: it reports each file and the token lengths, trains, and writes a complete checkpoint that
records the data it was made from."""

import json
import os

from conftest import SAMPLE_FILES

import finetune

SHAREGPT, MESSAGES = SAMPLE_FILES[1], SAMPLE_FILES[2]


def test_finetune_on_sharegpt_and_messages_mixed(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    final = finetune.main(finetune.parse_args([
        "--base_model", tiny_llama_dir, "--data_path", f"{SHAREGPT},{MESSAGES}", "--output_dir", str(out),
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
        "--cutoff_len", "96", "--overlong", "drop", "--val_set_size", "2", "--save_steps", "1000"]))
    log = capsys.readouterr().out.splitlines()
    # token lengths of the 16 conversations in SmolLM2's chat template (its default system prompt where none is
    # given), as tokenizer.apply_chat_template counts them: 33 54 54 57 63 66 67 68 80 91 | 100 127 147 157 168 184
    assert [line for line in log if line.startswith(("data:", "warning: dropped"))] == [
        f"data: {SHAREGPT}: 8 records (sharegpt)",
        f"data: {MESSAGES}: 8 records (messages)",
        "data: 16 records, tokens per record p50 68, p90 168, p99 184, max 184; 6 longer than --cutoff_len 96",
        "warning: dropped 6 record(s) longer than --cutoff_len 96 tokens (--overlong drop)",
        "data: 8 training / 2 validation examples, template 'tokenizer', cutoff 96 tokens",
    ]
    assert final == str(out / "checkpoint-final")
    assert {"adapter_model.safetensors", "adapter_config.json", "training_meta.json", "tokenizer_config.json"} <= \
        set(os.listdir(final))
    assert os.path.getsize(os.path.join(final, "adapter_model.safetensors")) > 10_000
    meta = json.loads(open(os.path.join(final, "training_meta.json"), encoding="utf-8").read())
    assert meta["data"] == {"files": [{"path": SHAREGPT, "format": "sharegpt", "records": 8},
                                      {"path": MESSAGES, "format": "messages", "records": 8}],
                            "overlong": "drop", "examples": 10}
    assert meta["args"]["data_format"] == "auto" and meta["global_step"] == 2

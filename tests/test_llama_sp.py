"""The LLaMA-1/2 path end to end on the CPU: a SentencePiece tokenizer.model (BOS added, no pad token, "▁"
spacing, byte fallback) trained on the sample data, paired with a tiny random LlamaConfig model (conftest.py).
finetune.py trains it in 4-bit with the llama2 template on ShareGPT + messages files, merge_lora.py merges it,
and the chat path (cli_demo.py) streams its Chinese reply: complete characters only, the exact planted text."""

import io
import json
import os
import sys

import pytest
from conftest import SAMPLE_FILES, sample_texts

import cli_demo
import finetune
import merge_lora
from utils.prompts import IGNORE_INDEX, encode_conversation, load_template

SHAREGPT, MESSAGES = SAMPLE_FILES[1], SAMPLE_FILES[2]


@pytest.fixture(scope="module")
def trained(tiny_llama_sp_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sp-run") / "out"
    final = finetune.main(finetune.parse_args([
        "--base_model", tiny_llama_sp_dir, "--data_path", SHAREGPT, MESSAGES, "--prompt_template", "llama2",
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "1", "--cutoff_len", "256", "--save_steps", "1000", "--seed", "1"]))
    return final


def test_tokenizer_is_llama_style(tiny_llama_sp_dir):
    from utils.modeling import load_tokenizer
    assert sorted(f for f in os.listdir(tiny_llama_sp_dir) if f.startswith("tokenizer")) == \
        ["tokenizer.model", "tokenizer_config.json"]  # as a LLaMA-2 checkpoint ships it: no tokenizer.json
    tok = load_tokenizer(tiny_llama_sp_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<unk>")  # pad chosen, not EOS
    assert tok("你好")["input_ids"][:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("\u2581")]
    assert tok.convert_ids_to_tokens(tok("羊", add_special_tokens=False)["input_ids"]) == \
        ["\u2581", "<0xE7>", "<0xBE>", "<0x8A>"]  # not in the sample data: UTF-8 bytes
    for text in sample_texts():  # lossless, except that decoding drops the space of a leading "▁"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == (text[1:] if text.startswith(" ") else text)


def test_llama2_template_masks_on_the_sentencepiece_tokenizer(tiny_llama_sp_dir):
    from utils.data import load_dataset
    from utils.modeling import load_tokenizer
    tok = load_tokenizer(tiny_llama_sp_dir)
    conversations, _ = load_dataset(SHAREGPT, log=lambda m: None)
    messages = conversations[3]  # zh, system prompt, two turns
    ids, labels = encode_conversation(tok, load_template("llama2"), messages)
    answer1, answer2 = "比喻做了多余的事，反而把事情弄糟。", "文章已经写得很好了，再加这段话就是画蛇添足。"
    assert tok.decode(ids) == ("<s> [INST] <<SYS>>\n你是一位耐心的语文老师，回答要简短。\n<</SYS>>\n\n"
                               f"“画蛇添足”是什么意思？ [/INST] {answer1}</s><s>[INST] 请用它造一个句子。 [/INST] "
                               f"{answer2}</s>")
    targets = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tok.decode(targets) == f"{answer1}</s> {answer2}</s>"
    assert ids.count(tok.bos_token_id) == 2 and ids.count(tok.eos_token_id) == 2


def test_finetune_records_llama2_and_keeps_the_sentencepiece_tokenizer(trained, tiny_llama_sp_dir):
    from utils.modeling import load_tokenizer
    meta = json.loads(open(os.path.join(trained, "training_meta.json"), encoding="utf-8").read())
    assert meta["prompt_template"]["name"] == "llama2" and meta["bits"] == 4 and meta["global_step"] == 2
    assert meta["data"]["files"] == [{"path": SHAREGPT, "format": "sharegpt", "records": 8},
                                     {"path": MESSAGES, "format": "messages", "records": 8}]
    saved, original = load_tokenizer(trained), load_tokenizer(tiny_llama_sp_dir)
    for text in sample_texts() + ["[INST] 羊驼 [/INST] </s><s>"]:
        assert saved(text)["input_ids"] == original(text)["input_ids"], text


def test_merge_then_chat_streams_complete_chinese_characters(trained, tiny_llama_sp_dir, tiny_llama_sp_reply,
                                                            tmp_path, monkeypatch, capsys):
    from utils.chat import load_chat_model
    merged = merge_lora.main(merge_lora.parse_args(["--lora_model", trained, "--output_dir", str(tmp_path)]))
    assert os.path.basename(merged) == os.path.basename(tiny_llama_sp_dir) + "-merged"

    # 2 whole cycles (10 tokens each: 羊 and 驼 are 3 byte tokens each), then 你好， and 1 of 羊's 3 bytes
    argv = ["--model_path", merged, "--temperature", "0", "--max_new_tokens", "24", "--num_gpus", "0"]
    expected = tiny_llama_sp_reply * 2 + "你好，"
    logs = []
    chat = load_chat_model(cli_demo.parse_args(argv), log=logs.append)
    assert logs[-1].endswith("template 'llama2' (recorded at training)")
    deltas = list(chat.stream([], "你好", cli_demo.parse_args(argv)))
    assert "".join(deltas) == expected and len(deltas) > 3
    assert not any("\ufffd" in d for d in deltas)

    # the same through cli_demo.py's main: piped questions, streamed output, history kept between them
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n再说一次\n"))
    history = cli_demo.main(cli_demo.parse_args(argv + ["--stream"]))
    assert history == [("你好", expected), ("再说一次", expected)]
    assert capsys.readouterr().out.count(f"Assistant: {expected}\n") == 2

    # base + adapter without merging (4-bit, as recorded) answers the same
    unmerged = load_chat_model(cli_demo.parse_args(["--lora_model", trained, "--temperature", "0",
                                                    "--max_new_tokens", "24", "--num_gpus", "0"]), log=logs.append)
    assert "".join(unmerged.stream([], "你好", {"max_new_tokens": 24, "temperature": 0})) == expected

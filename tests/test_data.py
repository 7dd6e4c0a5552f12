"""Data loading (utils/data.py): every bad file is a UserError naming the file, the record (or JSONL line) and
the field; good variants (BOM, JSONL) load; tokenizing truncates/drops with counts; padding never reaches the loss.
Last, the same errors through `python finetune.py`: exit code 2, one line, before any model is loaded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.args import UserError
from utils.data import load_dataset, pad_collate, tokenize_records
from utils.prompts import IGNORE_INDEX, load_template

ROOT = Path(__file__).resolve().parents[1]
OK = {"instruction": "Say hi.", "input": "", "output": "Hi!"}


def dump(*records):
    return json.dumps(list(records), ensure_ascii=False).encode("utf-8")


def jsonl(*lines):
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode("utf-8") + b"\n"


GBK_FILE = json.dumps([{"instruction": "把这句话翻译成英文", "output": "你好，世界"}], ensure_ascii=False).encode("gbk")

# name -> (file name, bytes, substrings the message must contain besides the path)
BAD = {
    "empty": ("d.json", b"", ["the file is empty"]),
    "blank": ("d.json", b"  \n\n", ["the file is empty"]),
    "not_json": ("d.json", b"instruction: hi\n", ["not valid JSON", "line 1 column 1"]),
    "truncated": ("d.json", b'[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "out',
                  ["not valid JSON", "line 3"]),
    "object": ("d.json", json.dumps(OK).encode(), ["expected a JSON list of records, got one object"]),
    "number": ("d.json", b"42", ["expected a JSON list of records, got int"]),
    "non_objects": ("d.json", b'["a", "b"]', ["record 0", "expected an object", "got str"]),
    "no_instruction": ("d.json", dump(OK, {"output": "x"}), ["record 1", "'instruction'", "missing"]),
    "empty_instruction": ("d.json", dump(OK, OK, {"instruction": "  ", "output": "x"}),
                          ["record 2", "'instruction'", "empty"]),
    "no_output": ("d.json", dump(OK, OK, {"instruction": "x"}), ["record 2", "'output'", "missing"]),
    "null_output": ("d.json", dump(OK, {"instruction": "x", "output": None}), ["record 1", "'output'"]),
    "int_output": ("d.json", dump(OK, {"instruction": "x", "output": 7}), ["record 1", "'output'", "string", "int"]),
    "list_instruction": ("d.json", dump({"instruction": ["a"], "output": "x"}),
                         ["record 0", "'instruction'", "string", "list"]),
    "int_input": ("d.json", dump(OK, {"instruction": "x", "input": 3, "output": "y"}),
                  ["record 1", "'input'", "string", "int"]),
    "history_string": ("d.json", dump(dict(OK, history="q a")), ["record 0", "'history'", "[question, answer]"]),
    "history_single": ("d.json", dump(OK, dict(OK, history=[["q"]])), ["record 1", "'history'"]),
    "history_int": ("d.json", dump(dict(OK, history=[["q", 1]])), ["record 0", "'history'"]),
    "no_records": ("d.json", b"[]", ["no usable records"]),
    "only_empty_outputs": ("d.json", dump({"instruction": "x", "output": ""}), ["no usable records"]),
    "not_utf8": ("d.json", b'[{"instruction": "caf\xff", "output": "x"}]', ["not UTF-8", "line 1"]),
    "gbk": ("d.json", GBK_FILE, ["not UTF-8", "GB18030", "iconv"]),
    "jsonl_bad_line3": ("d.jsonl", jsonl(OK, OK, '{"instruction": "x", "output": ', OK),
                        ["line 3", "not valid JSON"]),
    "jsonl_field_line3": ("d.jsonl", jsonl(OK, "", {"instruction": "x", "output": 1}),
                          ["line 3", "'output'", "int"]),
    "jsonl_as_json_bad_line3": ("d.json", jsonl(OK, OK, "{oops}"), ["line 3", "not valid JSON"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_data_names_file_record_and_field(tmp_path, name):
    fname, content, expected = BAD[name]
    path = tmp_path / fname
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_dataset(str(path), log=lambda msg: None)
    message = str(e.value)
    assert message.startswith(str(path)), message
    for part in expected:
        assert part in message, (part, message)
    assert "\n" not in message


def test_not_utf8_latin1_gets_no_gbk_hint(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(BAD["not_utf8"][1])
    with pytest.raises(UserError) as e:
        load_dataset(str(path))
    assert "GB18030" not in str(e.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(UserError, match="data file not found") as e:
        load_dataset(str(path))
    assert str(path) in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# Accepted variants
# ---------------------------------------------------------------------------------------------------------

NORMALISED = [{"instruction": "Say hi.", "output": "Hi!", "input": "", "history": []},
              {"instruction": "Add.", "output": "3", "input": "1 + 2", "history": [["Q", "A"]]}]
RAW = [{"instruction": "Say hi.", "output": "Hi!"},
       {"instruction": "Add.", "input": "1 + 2", "output": "3", "history": [["Q", "A"]], "extra": 1}]


@pytest.mark.parametrize("fname,content", [
    ("d.json", b"\xef\xbb\xbf" + dump(*RAW)),
    ("d.jsonl", jsonl(*RAW)),
    ("d.jsonl", b"\xef\xbb\xbf" + jsonl(RAW[0], "", "   ", RAW[1])),
    ("d.json", jsonl(*RAW)),  # JSON Lines saved with a .json name
], ids=["bom", "jsonl", "jsonl_bom_blank_lines", "jsonl_as_json"])
def test_accepted_formats(tmp_path, fname, content):
    path = tmp_path / fname
    path.write_bytes(content)
    logs = []
    assert load_dataset(str(path), log=logs.append) == NORMALISED
    assert logs == []


def test_null_input_and_history_are_absent(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(dump({"instruction": "x", "input": None, "output": "y", "history": None}))
    assert load_dataset(str(path)) == [{"instruction": "x", "output": "y", "input": "", "history": []}]


def test_chinese_utf8(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(dump({"instruction": "把这句话翻译成英文", "output": "你好，世界"}))
    assert load_dataset(str(path))[0]["output"] == "你好，世界"


def test_empty_outputs_dropped_with_count(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(dump(OK, {"instruction": "a", "output": ""}, {"instruction": "b", "output": " \n"},
                          {"instruction": "c", "output": "C"}))
    logs = []
    records = load_dataset(str(path), log=logs.append)
    assert [r["instruction"] for r in records] == ["Say hi.", "c"]
    assert logs == [f"warning: {path}: dropped 2 record(s) with an empty 'output' (nothing to learn)"]


def test_duplicates_kept_and_counted(tmp_path):
    path = tmp_path / "d.json"
    other = {"instruction": "c", "output": "C"}
    path.write_bytes(dump(OK, other, OK, OK, other, {"instruction": "Say hi.", "output": "Hi!", "input": None}))
    logs = []
    records = load_dataset(str(path), log=logs.append)
    assert len(records) == 6  # kept: repeating a record up-weights it
    assert logs == [f"warning: {path}: 4 duplicate record(s) kept (they count twice in the loss)"]


# ---------------------------------------------------------------------------------------------------------
# Tokenizing and padding (bundled SmolLM2 tokenizer, alpaca template)
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol():
    from utils.modeling import load_tokenizer, resolve_model_path
    return load_tokenizer(resolve_model_path("smollm2-135m"))


def rec(instruction, output):
    return {"instruction": instruction, "input": "", "output": output, "history": []}


def test_tokenize_records_truncates_and_drops_with_counts(smol):
    alpaca = load_template("alpaca")
    short = rec("Hi", "Hello")
    long_answer = rec("Hi", "word " * 200)
    long_prompt = rec("word " * 200, "Hello")
    logs = []
    examples = tokenize_records([short, long_answer, long_prompt, short], smol, alpaca, cutoff_len=64,
                                log=logs.append)
    assert len(examples) == 3
    full, cut, again = examples
    assert full == again and full["input_ids"][-1] == smol.eos_token_id
    assert full["attention_mask"] == [1] * len(full["input_ids"])
    assert len(cut["input_ids"]) == len(cut["labels"]) == 64
    assert cut["labels"][-1] != IGNORE_INDEX  # the cut answer still has targets
    # the dropped record was also longer than the cutoff, so it is counted among the truncated ones too
    assert logs == ["warning: 2 record(s) longer than --cutoff_len 64 tokens were truncated",
                    "warning: dropped 1 record(s) whose answer lies entirely beyond --cutoff_len 64"]


def test_tokenize_records_nothing_left(smol):
    with pytest.raises(UserError, match="raise --cutoff_len"):
        tokenize_records([rec("word " * 50, "x")], smol, load_template("alpaca"), cutoff_len=16, log=lambda m: None)


def test_tokenize_records_train_on_inputs(smol):
    (example,) = tokenize_records([rec("Hi", "Hello")], smol, load_template("alpaca"), cutoff_len=512,
                                  train_on_inputs=True, log=lambda m: None)
    assert example["labels"] == example["input_ids"]


def test_pad_collate_pads_with_pad_id_and_masks_padding(smol):
    assert smol.pad_token_id != smol.eos_token_id
    pad, eos = smol.pad_token_id, smol.eos_token_id
    a = {"input_ids": [5, 6, eos], "attention_mask": [1, 1, 1], "labels": [IGNORE_INDEX, 6, eos]}
    b = {"input_ids": [7, 8, 9, 10, eos], "attention_mask": [1] * 5, "labels": [IGNORE_INDEX, IGNORE_INDEX, 9, 10, eos]}
    batch = pad_collate(smol)([a, b])  # padded to a multiple of 8
    assert batch["input_ids"].tolist() == [[5, 6, eos] + [pad] * 5, [7, 8, 9, 10, eos] + [pad] * 3]
    assert batch["attention_mask"].tolist() == [[1] * 3 + [0] * 5, [1] * 5 + [0] * 3]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, eos] + [IGNORE_INDEX] * 5,
                                        [IGNORE_INDEX, IGNORE_INDEX, 9, 10, eos] + [IGNORE_INDEX] * 3]
    assert all(t.dtype == torch.long for t in batch.values())
    tight = pad_collate(smol, pad_to_multiple_of=None)([a, b])
    assert tight["input_ids"].tolist() == [[5, 6, eos, pad, pad], [7, 8, 9, 10, eos]]
    assert tight["labels"][0, 3:].tolist() == [IGNORE_INDEX] * 2


# ---------------------------------------------------------------------------------------------------------
# The same errors through the command line: one line, exit 2, nothing written, no model loaded
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("int_output", "record 1: field 'output' must be a string, got int"),
    ("jsonl_bad_line3", "line 3: not valid JSON"),
    ("history_single", "record 1: field 'history' must be a list of [question, answer] string pairs"),
])
def test_finetune_cli_rejects_bad_data_before_loading_a_model(tmp_path, name, expected):
    fname, content, _ = BAD[name]
    data = tmp_path / fname
    data.write_bytes(content)
    out = tmp_path / "out"
    env = dict(os.environ, LLAMA_QLORA_HOME=str(tmp_path / "cache"))  # a model load would have to convert here
    proc = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--data_path", str(data),
                           "--output_dir", str(out)], cwd=tmp_path, env=env, check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {data}: {expected}") and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.endswith("\n")
    assert "Traceback" not in proc.stdout + proc.stderr
    assert sorted(os.listdir(tmp_path)) == [fname]  # no output dir, no cache, nothing else

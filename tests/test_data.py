"""Data loading (utils/data.py): every bad file is a UserError naming the file, the record (or JSONL line), the
turn and the field, in each format (Alpaca, ShareGPT, messages); good variants (BOM, JSONL, parquet, save_to_disk
folders, several files) load into exact messages; tokenizing truncates/drops with counts and length percentiles,
masks all but the assistant turns; padding never reaches the loss. Last, the same errors through
`python finetune.py`: exit code 2, one line, before any model is loaded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.args import UserError
from utils.data import load_dataset, pad_collate, percentile, tokenize_records
from utils.prompts import IGNORE_INDEX, load_template

ROOT = Path(__file__).resolve().parents[1]
OK = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
SG_OK = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
MSG_OK = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def sg(*turns, **extra):
    """A ShareGPT record from (from, value) pairs."""
    return dict(extra, conversations=[{"from": f, "value": v} for f, v in turns])


def msgs(*turns):
    """A messages record from (role, content) pairs."""
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


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
    # format detection and mixing
    "unknown_format": ("d.json", dump({"question": "x", "answer": "y"}),
                       ["record 0: cannot tell the data format", "'conversations'", "--data_format"]),
    "mixed_fields": ("d.json", dump(SG_OK, dict(SG_OK, instruction="x")),
                     ["record 1: mixes the alpaca and sharegpt formats (fields 'instruction', 'conversations')"]),
    "mixed_fields_messages": ("d.jsonl", jsonl(MSG_OK, dict(MSG_OK, conversations=SG_OK["conversations"])),
                              ["line 2: mixes the sharegpt and messages formats"]),
    "mixed_records": ("d.json", dump(OK, SG_OK),
                      ["record 1: a sharegpt record, but the file is in alpaca format (detected from its first "
                       "record); use one format per file"]),
    "mixed_records_jsonl": ("d.jsonl", jsonl(SG_OK, SG_OK, MSG_OK),
                            ["line 3: a messages record, but the file is in sharegpt format"]),
    # ShareGPT
    "sg_wrong_role": ("d.json", dump(SG_OK, sg(("human", "Hi"), ("bot", "Hello"))),
                      ["record 1: turn 1: unknown role 'bot' in 'from'; use one of system, human, user, gpt, "
                       "assistant"]),
    "sg_empty_conversation": ("d.json", dump(SG_OK, {"conversations": []}),
                              ["record 1: field 'conversations' is empty"]),
    "sg_no_assistant": ("d.json", dump(SG_OK, sg(("human", "Hi"))), ["record 1: the conversation has no assistant"]),
    "sg_system_only": ("d.json", dump(sg(("system", "Be brief."))), ["record 0: the conversation has no assistant"]),
    "sg_empty_system_only": ("d.json", dump(sg(("system", ""))), ["record 0: the conversation has no assistant"]),
    "sg_value_int": ("d.json", dump(sg(("human", "Hi"), ("gpt", 3))),
                     ["record 0: turn 1: field 'value' must be a string, got int"]),
    "sg_value_missing": ("d.json", dump({"conversations": [{"from": "human"}]}),
                         ["record 0: turn 0: field 'value' must be a string, got null"]),
    "sg_from_missing": ("d.json", dump({"conversations": [{"value": "Hi"}]}),
                        ["record 0: turn 0: field 'from' is missing"]),
    "sg_openai_turn": ("d.json", dump({"conversations": [{"role": "user", "content": "Hi"}]}),
                       ["record 0: turn 0: field 'from' is missing (it has 'role': a messages-format turn in a "
                        "sharegpt record)"]),
    "sg_not_list": ("d.json", dump({"conversations": "Hi"}),
                    ["record 0: field 'conversations' must be a list of turns, got str"]),
    "sg_turn_not_object": ("d.json", dump({"conversations": ["Hi"]}),
                           ["record 0: turn 0: expected an object with 'from' and 'value', got str"]),
    "sg_two_user_turns": ("d.json", dump(sg(("human", "Hi"), ("human", "Hello?"), ("gpt", "Yes"))),
                          ["record 0: turn 1: expected an assistant turn, got 'human'"]),
    "sg_starts_with_gpt": ("d.json", dump(sg(("gpt", "Hello"), ("human", "Hi"), ("gpt", "Yes"))),
                           ["record 0: turn 0: expected a user turn, got 'gpt'"]),
    "sg_late_system": ("d.json", dump(sg(("human", "Hi"), ("gpt", "Yes"), ("system", "Be brief."))),
                       ["record 0: turn 2: a system turn ('system') may only come first"]),
    "sg_empty_user": ("d.json", dump(sg(("human", " "), ("gpt", "Yes"))),
                      ["record 0: turn 0: field 'value' of a user turn is empty"]),
    # OpenAI-style messages
    "msg_wrong_role": ("d.jsonl", jsonl(MSG_OK, msgs(("user", "Hi"), ("tool", "42"))),
                       ["line 2: turn 1: unknown role 'tool' in 'role'; use one of system, user, assistant"]),
    "msg_sharegpt_role_name": ("d.jsonl", jsonl(msgs(("human", "Hi"), ("assistant", "Yes"))),
                               ["line 1: turn 0: unknown role 'human' in 'role'"]),
    "msg_empty": ("d.jsonl", jsonl(MSG_OK, "", {"messages": []}), ["line 3: field 'messages' is empty"]),
    "msg_no_assistant": ("d.jsonl", jsonl(msgs(("system", "S"), ("user", "Hi"))),
                         ["line 1: the conversation has no assistant turn"]),
    "msg_content_null": ("d.jsonl", jsonl(msgs(("user", "Hi"), ("assistant", None))),
                         ["line 1: turn 1: field 'content' must be a string, got null"]),
    "msg_content_parts": ("d.jsonl", jsonl({"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
                          ["line 1: turn 0: field 'content' must be a string, got list"]),
    "msg_not_list": ("d.jsonl", jsonl({"messages": {"role": "user"}}),
                     ["line 1: field 'messages' must be a list of turns, got dict"]),
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

NORMALISED = [[{"role": "user", "content": "Say hi.", "input": ""}, {"role": "assistant", "content": "Hi!"}],
              [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
               {"role": "user", "content": "Add.", "input": "1 + 2"}, {"role": "assistant", "content": "3"}]]
RAW = [{"instruction": "Say hi.", "output": "Hi!"},
       {"instruction": "Add.", "input": "1 + 2", "output": "3", "history": [["Q", "A"]], "extra": 1}]


def load(path, data_format="auto"):
    """(conversations, log lines) of one file."""
    logs = []
    conversations, files = load_dataset(str(path), data_format, log=logs.append)
    assert [f["path"] for f in files] == [str(path)]
    return conversations, logs


@pytest.mark.parametrize("fname,content", [
    ("d.json", b"\xef\xbb\xbf" + dump(*RAW)),
    ("d.jsonl", jsonl(*RAW)),
    ("d.jsonl", b"\xef\xbb\xbf" + jsonl(RAW[0], "", "   ", RAW[1])),
    ("d.json", jsonl(*RAW)),  # JSON Lines saved with a .json name
], ids=["bom", "jsonl", "jsonl_bom_blank_lines", "jsonl_as_json"])
def test_accepted_formats(tmp_path, fname, content):
    path = tmp_path / fname
    path.write_bytes(content)
    assert load(path) == (NORMALISED, [f"data: {path}: 2 records (alpaca)"])


def test_null_input_and_history_are_absent(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(dump({"instruction": "x", "input": None, "output": "y", "history": None}))
    assert load(path)[0] == [[{"role": "user", "content": "x", "input": ""}, {"role": "assistant", "content": "y"}]]


SG_EXPECTED = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
               {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
               {"role": "assistant", "content": "A2"}]


def test_sharegpt_every_role_spelling(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(dump(sg(("system", "Be brief."), ("human", "Q1"), ("gpt", "A1"), ("user", "Q2"),
                             ("assistant", "A2"), id="x1"),
                          sg(("human", "Q1"), ("gpt", "A1"))))
    assert load(path) == ([SG_EXPECTED, SG_EXPECTED[1:3]], [f"data: {path}: 2 records (sharegpt)"])


def test_messages_format(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(msgs(("system", "Be brief."), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"),
                                ("assistant", "A2"))))
    assert load(path) == ([SG_EXPECTED], [f"data: {path}: 1 records (messages)"])


def test_trailing_user_turn_dropped_and_counted_empty_system_ignored(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(dump(sg(("human", "Q1"), ("gpt", "A1"), ("human", "Q2")),
                          sg(("system", ""), ("human", "Q1"), ("gpt", "A1"))))
    assert load(path) == ([SG_EXPECTED[1:3], SG_EXPECTED[1:3]], [
        f"warning: {path}: dropped the trailing user turn (a question without an answer) of 1 record(s)",
        f"warning: {path}: 1 duplicate record(s) kept (they count twice in the loss)",
        f"data: {path}: 2 records (sharegpt)"])


def test_empty_assistant_turn_drops_the_record(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(MSG_OK, msgs(("user", "Q1"), ("assistant", " "), ("user", "Q2"), ("assistant", "A2"))))
    conversations, logs = load(path)
    assert len(conversations) == 1
    assert logs[0] == f"warning: {path}: dropped 1 record(s) with an empty answer (nothing to learn)"


def test_data_format_flag_forces_the_format(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(dump(SG_OK))
    assert load(path, "sharegpt")[0] == load(path)[0]
    with pytest.raises(UserError) as e:
        load(path, "messages")
    assert str(e.value) == (f"{path}: record 0: a sharegpt record, but the file is in messages format "
                            "(--data_format); use one format per file")
    path.write_bytes(dump({"id": 1}))
    with pytest.raises(UserError, match=r"record 0: field 'conversations' is missing$"):
        load(path, "sharegpt")
    with pytest.raises(UserError, match=r"record 0: field 'instruction' is missing$"):
        load(path, "alpaca")


def test_several_files_mixed_formats_detected_per_file(tmp_path):
    paths = [tmp_path / "a.json", tmp_path / "b.jsonl", tmp_path / "c.json"]
    paths[0].write_bytes(dump(OK))
    paths[1].write_bytes(jsonl(MSG_OK, MSG_OK))
    paths[2].write_bytes(dump(SG_OK))
    logs = []
    conversations, files = load_dataset([str(p) for p in paths], log=logs.append)
    hello = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert conversations == [NORMALISED[0], hello, hello, hello]
    assert files == [{"path": str(paths[0]), "format": "alpaca", "records": 1},
                     {"path": str(paths[1]), "format": "messages", "records": 2},
                     {"path": str(paths[2]), "format": "sharegpt", "records": 1}]
    assert logs == [f"data: {paths[0]}: 1 records (alpaca)",
                    f"warning: {paths[1]}: 1 duplicate record(s) kept (they count twice in the loss)",
                    f"data: {paths[1]}: 2 records (messages)", f"data: {paths[2]}: 1 records (sharegpt)"]
    paths[2].write_bytes(dump(sg(("human", "Hi"), ("robot", "x"))))  # an error names the file it is in
    with pytest.raises(UserError, match=rf"^{paths[2]}: record 0: turn 1: unknown role 'robot'"):
        load_dataset([str(p) for p in paths], log=logs.append)


def test_sample_files_load():
    logs = []
    conversations, files = load_dataset([str(ROOT / "dataset" / f) for f in
                                         ("sample.json", "sample_sharegpt.json", "sample_messages.jsonl")],
                                        log=logs.append)
    assert [(f["format"], f["records"]) for f in files] == [("alpaca", 48), ("sharegpt", 8), ("messages", 8)]
    assert all(line.startswith("data: ") for line in logs), logs  # no warnings about the bundled samples
    multi_turn = [c for c in conversations if sum(m["role"] == "assistant" for m in c) > 1]
    with_system = [c for c in conversations if c[0]["role"] == "system"]
    assert len(multi_turn) == 8 and len(with_system) == 4
    assert any("\u4e00" <= ch <= "\u9fff" for c in conversations for m in c for ch in m["content"])


# ---------------------------------------------------------------------------------------------------------
# parquet files and folders written by datasets' save_to_disk
# ---------------------------------------------------------------------------------------------------------

def test_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([SG_OK, sg(("system", "S"), ("human", "Q"), ("gpt", "A"))]), path)
    hello = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert load(path) == ([hello, [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                   {"role": "assistant", "content": "A"}]], [f"data: {path}: 2 records (sharegpt)"])


def test_parquet_with_null_columns_and_a_bad_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "d.parquet"
    # rows of one table share columns: a missing 'input' is null, which counts as absent
    pq.write_table(pa.Table.from_pylist([OK, {"instruction": "x", "output": "y", "input": None},
                                         {"instruction": "z", "output": None}]), path)
    with pytest.raises(UserError, match=rf"^{path}: record 2: field 'output' is missing$"):
        load(path)


def test_broken_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match=rf"^{path}: not a readable parquet file \(\w+: [^\n]+\)$"):
        load(path)


def test_save_to_disk_folders(tmp_path):
    import datasets
    one = datasets.Dataset.from_list([MSG_OK, MSG_OK])
    one.save_to_disk(str(tmp_path / "one"))
    hello = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert load(tmp_path / "one")[0] == [hello, hello]
    datasets.DatasetDict(train=datasets.Dataset.from_list([OK]), test=one).save_to_disk(str(tmp_path / "dict"))
    assert load(tmp_path / "dict")[0] == [NORMALISED[0]]  # the 'train' split
    datasets.DatasetDict(test=one).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(UserError, match=r"without a 'train' split \(it has test\)"):
        load(tmp_path / "no_train")
    (tmp_path / "one" / "state.json").write_text("{oops")
    with pytest.raises(UserError, match=rf"^{tmp_path / 'one'}: cannot load the saved dataset \(\w+: [^\n]+\)$"):
        load(tmp_path / "one")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match=rf"^{tmp_path / 'plain'}: a folder, but not one written by datasets"):
        load(tmp_path / "plain")


def test_chinese_utf8(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(dump({"instruction": "把这句话翻译成英文", "output": "你好，世界"}))
    assert load(path)[0] == [[{"role": "user", "content": "把这句话翻译成英文", "input": ""},
                              {"role": "assistant", "content": "你好，世界"}]]


def test_empty_outputs_dropped_with_count(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(dump(OK, {"instruction": "a", "output": ""}, {"instruction": "b", "output": " \n"},
                          {"instruction": "c", "output": "C"}))
    conversations, logs = load(path)
    assert [c[0]["content"] for c in conversations] == ["Say hi.", "c"]
    assert logs == [f"warning: {path}: dropped 2 record(s) with an empty answer (nothing to learn)",
                    f"data: {path}: 2 records (alpaca)"]


def test_duplicates_kept_and_counted(tmp_path):
    path = tmp_path / "d.json"
    other = {"instruction": "c", "output": "C"}
    path.write_bytes(dump(OK, other, OK, OK, other, {"instruction": "Say hi.", "output": "Hi!", "input": None}))
    conversations, logs = load(path)
    assert len(conversations) == 6  # kept: repeating a record up-weights it
    assert logs == [f"warning: {path}: 4 duplicate record(s) kept (they count twice in the loss)",
                    f"data: {path}: 6 records (alpaca)"]


# ---------------------------------------------------------------------------------------------------------
# Tokenizing and padding (bundled SmolLM2 tokenizer, alpaca template)
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol():
    from utils.modeling import load_tokenizer, resolve_model_path
    return load_tokenizer(resolve_model_path("smollm2-135m"))


def rec(instruction, output):
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]


SHORT, LONG_ANSWER, LONG_PROMPT = rec("Hi", "Hello"), rec("Hi", "word " * 200), rec("word " * 200, "Hello")


def test_tokenize_records_truncates_and_drops_with_counts(smol):
    logs = []
    examples = tokenize_records([SHORT, LONG_ANSWER, LONG_PROMPT, SHORT], smol, load_template("alpaca"),
                                cutoff_len=64, log=logs.append)
    assert len(examples) == 3
    full, cut, again = examples
    assert full == again and full["input_ids"][-1] == smol.eos_token_id
    assert full["attention_mask"] == [1] * len(full["input_ids"])
    assert len(cut["input_ids"]) == len(cut["labels"]) == 64
    assert cut["labels"][-1] != IGNORE_INDEX  # the cut answer still has targets
    # lengths before the cutoff: 33, 233, 233, 33
    assert logs == ["data: 4 records, tokens per record p50 33, p90 233, p99 233, max 233; 2 longer than "
                    "--cutoff_len 64",
                    "warning: 1 record(s) longer than --cutoff_len 64 tokens were truncated",
                    "warning: dropped 1 record(s) whose answers lie entirely beyond --cutoff_len 64"]


def test_tokenize_records_overlong_drop(smol):
    logs = []
    examples = tokenize_records([SHORT, LONG_ANSWER, LONG_PROMPT, SHORT], smol, load_template("alpaca"),
                                cutoff_len=64, overlong="drop", log=logs.append)
    assert len(examples) == 2 and examples[0] == examples[1] and len(examples[0]["input_ids"]) == 33
    assert logs[1:] == ["warning: dropped 2 record(s) longer than --cutoff_len 64 tokens (--overlong drop)"]
    with pytest.raises(UserError, match="raise --cutoff_len or pass --overlong truncate"):
        tokenize_records([LONG_ANSWER], smol, load_template("alpaca"), cutoff_len=64, overlong="drop",
                         log=lambda m: None)


def test_tokenize_records_nothing_left(smol):
    with pytest.raises(UserError, match="raise --cutoff_len$"):
        tokenize_records([rec("word " * 50, "x")], smol, load_template("alpaca"), cutoff_len=16, log=lambda m: None)


def test_tokenize_records_train_on_inputs(smol):
    (example,) = tokenize_records([rec("Hi", "Hello")], smol, load_template("alpaca"), cutoff_len=512,
                                  train_on_inputs=True, log=lambda m: None)
    assert example["labels"] == example["input_ids"]


@pytest.mark.parametrize("values,expected", [
    ([7], (7, 7, 7)),
    (list(range(10, 0, -1)), (5, 9, 10)),  # unsorted input; nearest rank: ceil(q% of 10)-th smallest
    (list(range(1, 201)), (100, 180, 198)),
    ([3, 1, 2, 100], (2, 100, 100)),
])
def test_percentile_nearest_rank(values, expected):
    assert tuple(percentile(values, q) for q in (50, 90, 99)) == expected


def test_every_assistant_turn_is_a_target_system_and_user_masked(smol):
    """A ShareGPT conversation through the loader and tokenize_records: exactly the assistant turns are in
    the loss, each with its EOS; with --train_on_inputs, everything."""
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                    {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                    {"role": "assistant", "content": "A2"}]
    for name, answers, masked in [
        ("chat", ["A1<|im_end|>", "A2<|im_end|>"],
         "Be brief.\n\nUser:Q1\n\nAssistant:\n\nUser:Q2\n\nAssistant:"),
        ("tokenizer", ["A1<|im_end|>\n", "A2<|im_end|>\n"],
         "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n"
         "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"),
    ]:
        (example,) = tokenize_records([conversation], smol, load_template(name, smol), cutoff_len=512,
                                      log=lambda m: None)
        ids, labels = example["input_ids"], example["labels"]
        runs, start = [], None
        for i, label in enumerate(labels + [IGNORE_INDEX]):
            if label != IGNORE_INDEX and start is None:
                start = i
            elif label == IGNORE_INDEX and start is not None:
                runs.append(smol.decode(ids[start:i]))
                start = None
        assert runs == answers, name
        assert smol.decode([i for i, label in zip(ids, labels) if label == IGNORE_INDEX]) == masked, name
        (everything,) = tokenize_records([conversation], smol, load_template(name, smol), cutoff_len=512,
                                         train_on_inputs=True, log=lambda m: None)
        assert everything["input_ids"] == ids and everything["labels"] == ids


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
    # the second of two files (comma-separated), after a good Alpaca file
    ("sg_wrong_role", "record 1: turn 1: unknown role 'bot' in 'from'; use one of system, human, user, gpt, "
                      "assistant"),
])
def test_finetune_cli_rejects_bad_data_before_loading_a_model(tmp_path, name, expected):
    fname, content, _ = BAD[name]
    data = tmp_path / fname
    data.write_bytes(content)
    paths = f"{ROOT / 'dataset' / 'sample.json'},{data}" if name.startswith("sg_") else str(data)
    out = tmp_path / "out"
    env = dict(os.environ, LLAMA_QLORA_HOME=str(tmp_path / "cache"))  # a model load would have to convert here
    proc = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--data_path", paths,
                           "--output_dir", str(out)], cwd=tmp_path, env=env, check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {data}: {expected}") and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.endswith("\n")
    assert "Traceback" not in proc.stdout + proc.stderr
    assert sorted(os.listdir(tmp_path)) == [fname]  # no output dir, no cache, nothing else

"""Fuzzing the data loader: random mutations of valid files plus a fixed corpus of nasty ones.

Every file must either load (then tokenize) or fail with a UserError whose message is one line and names the
file. Any other exception, a multi-line message or a hang is a bug. The mutations are seeded, so a failure
prints the seed and case number that reproduce it.
"""

import json
import os
import random

import pytest

from utils.args import UserError
from utils.data import load_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20261127
BYTE_CASES = 1800  # byte-level mutations, over 3 formats x 2 file kinds
JSON_CASES = 800  # structure-aware mutations

VALID = [
    {"instruction": "把这句话翻译成英文", "input": "今天天气很好。", "output": "The weather is nice today."},
    {"instruction": "Name a prime number.", "input": "", "output": "7"},
    {"instruction": "继续对话", "output": "好的。", "history": [["你好", "你好！"], ["你是谁？", "一个助手。"]]},
]

SHAREGPT = [
    {"conversations": [{"from": "system", "value": "你是一个助手。"}, {"from": "human", "value": "你好"},
                       {"from": "gpt", "value": "你好！"}, {"from": "human", "value": "1+1?"},
                       {"from": "gpt", "value": "2"}]},
    {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]},
]
MESSAGES = [
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "天空是什么颜色？"},
                  {"role": "assistant", "content": "蓝色。"}]},
]
SEEDS = {"alpaca": VALID, "sharegpt": SHAREGPT, "messages": MESSAGES}

# Values a hostile or broken file may put anywhere.
ODD_VALUES = [None, "", " ", 0, -1, 1.5, float("nan"), True, [], {}, [[]], ["a"], [["q"]], [["q", 1]],
              {"a": "b"}, "\ud800", "\x00", "a" * 5000, "\u202e", "é" * 10, [["q", "a"]] * 3]


def _check_outcome(path, tokenizer=None):
    """Load `path`; return 'ok' or 'error'. Fails the test on anything but a clean one-line UserError."""
    try:
        records, _ = load_dataset(path, log=lambda *a: None)
    except UserError as e:
        message = str(e)
        assert "\n" not in message, f"multi-line error: {message!r}"
        assert path in message, f"error does not name the file: {message!r}"
        return "error"
    assert records and all(isinstance(m["content"], str) for messages in records for m in messages)
    if tokenizer is not None:
        from utils.data import tokenize_records
        from utils.prompts import load_template
        examples = tokenize_records(records, tokenizer, load_template("alpaca", tokenizer), 256,
                                    log=lambda *a: None)
        assert examples and all(len(e["input_ids"]) <= 256 for e in examples)
    return "ok"


def _byte_mutation(rng, raw):
    """One to three random edits of the file's bytes."""
    data = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(("flip", "delete", "insert", "truncate", "duplicate", "swap"))
        pos = rng.randrange(len(data) + 1) if data else 0
        if op == "flip" and data:
            data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == "delete":
            del data[pos:pos + rng.randint(1, 16)]
        elif op == "insert":
            data[pos:pos] = rng.choice([b"\x00", b"\xff\xfe", b"\xe4\xbd", b"\"", b",", b"}", b"]", b"\n", b"{",
                                        b"[", b"\xef\xbb\xbf", b"null", "你".encode("gbk"), b"\\u", b"NaN"])
        elif op == "truncate":
            data = data[:pos]
        elif op == "duplicate" and data:
            end = min(len(data), pos + rng.randint(1, 64))
            data[pos:pos] = data[pos:end]
        elif op == "swap" and len(data) > 2:
            i, j = sorted(rng.sample(range(len(data)), 2))
            data[i], data[j] = data[j], data[i]
    return bytes(data)


def _json_mutation(rng, records):
    """Structural edits: wrong types, missing / null / odd fields, odd top level, nesting."""
    records = json.loads(json.dumps(records))
    op = rng.choice(("field", "drop", "record", "toplevel", "extra", "nest", "empty"))
    if op == "field" and records:
        rec = rng.choice([r for r in records if isinstance(r, dict)] or [{}])
        rec[rng.choice(("instruction", "input", "output", "history"))] = rng.choice(ODD_VALUES)
    elif op == "drop" and records:
        rec = rng.choice([r for r in records if isinstance(r, dict)] or [{}])
        rec.pop(rng.choice(("instruction", "input", "output", "history")), None)
    elif op == "record" and records:
        records[rng.randrange(len(records))] = rng.choice(ODD_VALUES)
    elif op == "toplevel":
        return rng.choice(ODD_VALUES + [records[0] if records else {}])
    elif op == "extra" and records:
        rng.choice([r for r in records if isinstance(r, dict)] or [{}])[rng.choice(("x", "", "输出"))] = "y"
    elif op == "nest":
        return [records] if rng.random() < 0.5 else {"data": records}
    elif op == "empty":
        return []
    return records


def _write(tmp_path, name, content):
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _dumps(obj, rng):
    return json.dumps(obj, ensure_ascii=rng.random() < 0.5, allow_nan=True)


def _run_cases(tmp_path, tokenizer, cases, label, tokenize_every):
    """Write each (file name, bytes) of `cases` and check it; tokenize every `tokenize_every`-th one that loads.
    Fails with the case number and label that reproduce a crash; asserts both outcomes were reached."""
    seen = {"ok": 0, "error": 0}
    for case, (name, content) in enumerate(cases):
        path = _write(tmp_path, name, content)
        try:
            seen[_check_outcome(path, tokenizer if case % tokenize_every == 0 else None)] += 1
        except Exception as e:  # report the reproducer, then fail
            raise AssertionError(f"case {case} ({label}, seed {SEED}): {type(e).__name__}: {e}") from e
    print(f"{label}: {seen}")
    assert seen["ok"] > 0 and seen["error"] > 0, seen  # the mutations reach both outcomes


def _json_file(rng, records, jsonl):
    content = "\n".join(_dumps(r, rng) for r in records) if jsonl else _dumps(records, rng)
    return "case.jsonl" if jsonl else "case.json", content.encode("utf-8", "surrogatepass")


def test_fixed_corpus_of_bad_files(tmp_path, tiny_tokenizer):
    corpus = {
        "empty.json": b"",
        "spaces.json": b"   \n\t ",
        "bom_only.json": b"\xef\xbb\xbf",
        "null.json": b"null",
        "number.json": b"42",
        "string.json": b'"hello"',
        "deep.json": b"[" * 100000 + b"]" * 100000,  # Python's json recursion limit
        "deep_jsonl.jsonl": b"[" * 100000 + b"]" * 100000 + b"\n",
        "deep_record.json": b'[{"instruction": "a", "output": ' + b"[" * 50000 + b"]" * 50000 + b"}]",
        "truncated.json": json.dumps(VALID).encode()[:-7],
        "nul_bytes.json": b"\x00" * 64,
        "utf16.json": json.dumps(VALID).encode("utf-16"),
        "gbk.json": json.dumps(VALID, ensure_ascii=False).encode("gbk"),
        "latin1.jsonl": b'{"instruction": "caf\xe9", "output": "x"}\n',
        "lone_surrogate.json": b'[{"instruction": "\\ud800", "output": "\\udfff"}]',
        "huge_number.json": b'[{"instruction": "a", "output": 1e999}]',
        "nan.json": b'[{"instruction": NaN, "output": "x"}]',
        "dup_keys.json": b'[{"instruction": "a", "instruction": 3, "output": "x"}]',
        "bad_line.jsonl": b'{"instruction": "a", "output": "b"}\n{"instruction": \n',
        "crlf.jsonl": b'{"instruction": "a", "output": "b"}\r\n\r\n{"instruction": "c", "output": "d"}\r\n',
        "only_blank_lines.jsonl": b"\n\n\n",
        "all_empty_outputs.json": b'[{"instruction": "a", "output": ""}, {"instruction": "b", "output": " "}]',
        "duplicates.json": json.dumps([VALID[0]] * 5).encode(),
    }
    outcomes = {name: _check_outcome(_write(tmp_path, name, content), tiny_tokenizer)
                for name, content in corpus.items()}
    # only the two files that hold usable records load; every other one is a clean one-line error
    assert {n for n, o in outcomes.items() if o == "ok"} == {"crlf.jsonl", "duplicates.json"}, outcomes


@pytest.mark.parametrize("fmt", list(SEEDS))
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_random_byte_mutations_never_crash(tmp_path, tiny_tokenizer, fmt, suffix):
    rng = random.Random(f"{SEED}{fmt}{suffix}")
    seed_file = (json.dumps(SEEDS[fmt], ensure_ascii=False, indent=1) if suffix == ".json"
                 else "\n".join(json.dumps(r, ensure_ascii=False) for r in SEEDS[fmt])).encode("utf-8")
    cases = ((f"case{suffix}", _byte_mutation(rng, seed_file)) for _ in range(BYTE_CASES // 6))
    _run_cases(tmp_path, tiny_tokenizer, cases, f"byte mutations {fmt}{suffix}", tokenize_every=20)


def _turn_mutation(rng, records):
    """Structural edits of conversation records: roles, contents, turns, the list itself."""
    records = json.loads(json.dumps(records))
    rec = rng.choice(records)
    key = "conversations" if "conversations" in rec else "messages"
    role_key, text_key = ("from", "value") if key == "conversations" else ("role", "content")
    turns = rec[key] if isinstance(rec.get(key), list) else []
    dict_turns = [t for t in turns if isinstance(t, dict)]
    op = rng.choice(("role", "text", "drop_turn", "dup_turn", "turns", "turn", "mix", "keys"))
    if op == "role" and dict_turns:
        rng.choice(dict_turns)[role_key] = rng.choice(["Human", "bot", "", None, 3, "tool", "assistant", "gpt",
                                                  "human", "user", "system"])
    elif op == "text" and dict_turns:
        rng.choice(dict_turns)[text_key] = rng.choice(ODD_VALUES)
    elif op == "drop_turn" and turns:
        turns.pop(rng.randrange(len(turns)))
    elif op == "dup_turn" and turns:
        i = rng.randrange(len(turns))
        turns.insert(i, json.loads(json.dumps(turns[i])))
    elif op == "turns":
        rec[key] = rng.choice(ODD_VALUES)
    elif op == "turn" and turns:
        turns[rng.randrange(len(turns))] = rng.choice(ODD_VALUES)
    elif op == "mix":
        rec["instruction"] = "x"
    elif op == "keys" and dict_turns:
        rng.choice(dict_turns).pop(rng.choice([role_key, text_key]), None)
    return records


def test_random_conversation_mutations_never_crash(tmp_path, tiny_tokenizer):
    rng = random.Random(SEED + 1)

    def cases():
        for _ in range(JSON_CASES // 2):
            records = SEEDS[rng.choice(["sharegpt", "messages"])]
            for _ in range(rng.randint(1, 3)):
                records = _turn_mutation(rng, records)
            yield _json_file(rng, records, jsonl=rng.random() < 0.3)

    _run_cases(tmp_path, tiny_tokenizer, cases(), "conversation mutations", tokenize_every=10)


def test_random_structural_mutations_never_crash(tmp_path, tiny_tokenizer):
    rng = random.Random(SEED)

    def cases():
        for _ in range(JSON_CASES):
            records = VALID
            for _ in range(rng.randint(1, 3)):
                records = _json_mutation(rng, records if isinstance(records, list) else [records])
            yield _json_file(rng, records, jsonl=rng.random() < 0.3 and isinstance(records, list))

    _run_cases(tmp_path, tiny_tokenizer, cases(), "structural mutations", tokenize_every=10)

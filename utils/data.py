"""Training data: read and validate conversations in three formats, then tokenize with the prompt template.

Formats (detected per file from its first record, or forced with --data_format):
  alpaca    {"instruction", "input", "output", "history": [[question, answer], ...]}
  sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
Files: a JSON list, JSON Lines, a .parquet file, or a folder written by `datasets.save_to_disk`.
Every record becomes a list of messages ({"role", "content"}; an Alpaca `input` rides along on its user turn),
the one form that `utils.prompts.encode_conversation` turns into (input_ids, labels).

Every problem names the file, the record (0-based index, or line number for JSONL), the turn and the field,
and is raised before any model is loaded.
"""

import json
import math
import os
import random
from collections import Counter

import torch

from utils.args import OVERLONG, UserError
from utils.prompts import IGNORE_INDEX, encode_conversation, record_to_messages

# the fields that say which format a record is in (a field holding null does not count)
FORMAT_FIELDS = {"alpaca": ("instruction", "output"), "sharegpt": ("conversations",), "messages": ("messages",)}
# per conversation format: the list field, the turn's role and text keys, and how role names map
TURN_SCHEMA = {
    "sharegpt": ("conversations", "from", "value",
                 {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}),
    "messages": ("messages", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
}


def _read_text(path):
    if not os.path.isfile(path):
        raise UserError(f"data file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM, as Windows editors write it
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        hint = ""
        try:
            raw.decode("gb18030")
            hint = " (it looks like GBK/GB18030: convert with `iconv -f GB18030 -t UTF-8`)"
        except UnicodeDecodeError:
            pass
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not UTF-8 text{hint}") from None


def read_records(path):
    """Every record of one data file as [(where, record)], `where` naming it for error messages: a folder written
    by `datasets.save_to_disk`, a .parquet file, a JSON list of objects, or JSON Lines (blank lines skipped)."""
    if os.path.isdir(path):
        return _read_saved_dataset(path)
    if path.endswith(".parquet"):
        return _read_parquet(path)
    text = _read_text(path)
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    jsonl = path.endswith(".jsonl")
    if not jsonl:
        try:
            data = json.loads(text)
        except RecursionError:
            raise UserError(f"{path}: not valid data: nested too deeply") from None
        except json.JSONDecodeError as e:
            if e.msg == "Extra data" and text.lstrip().startswith("{"):
                jsonl = True  # JSON Lines saved as .json
            else:
                raise UserError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if jsonl:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"line {lineno}", json.loads(line)))
            except RecursionError:
                raise UserError(f"{path}: line {lineno}: not valid data: nested too deeply") from None
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
        return records
    if isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON list of records, got one object (wrap it in [ ... ])")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [(f"record {i}", r) for i, r in enumerate(data)]


def _read_parquet(path):
    if not os.path.isfile(path):
        raise UserError(f"data file not found: {path}")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow: pip install 'datasets>=2.19'") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for a damaged or foreign file
        raise UserError(f"{path}: not a readable parquet file ({_one_line(e)})") from None
    return [(f"record {i}", r) for i, r in enumerate(rows)]


def _one_line(error):
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _read_saved_dataset(path):
    """A `datasets.save_to_disk` folder: one Dataset (state.json + dataset_info.json), or a DatasetDict
    (dataset_dict.json), whose 'train' split is used."""
    is_dataset = all(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_info.json"))
    if not is_dataset and not os.path.isfile(os.path.join(path, "dataset_dict.json")):
        raise UserError(f"{path}: a folder, but not one written by datasets' save_to_disk (no state.json and "
                        "dataset_info.json, nor dataset_dict.json); point --data_path at a data file")
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path}: reading a save_to_disk folder needs datasets: pip install 'datasets>=2.19'") \
            from None
    try:
        data = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises several types for a damaged folder
        raise UserError(f"{path}: cannot load the saved dataset ({_one_line(e)})") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise UserError(f"{path}: a saved DatasetDict without a 'train' split (it has {', '.join(data)}); "
                            f"point --data_path at one split's folder, e.g. {os.path.join(path, next(iter(data)))}")
        data = data["train"]
    return [(f"record {i}", r) for i, r in enumerate(data)]


def _check_record(path, where, rec):
    """Return the record normalised ({instruction, input, output, history}), or raise naming the field."""
    def fail(msg):
        raise UserError(f"{path}: {where}: {msg}")

    out = {}
    for field in ("instruction", "output"):
        if field not in rec or rec[field] is None:
            fail(f"field '{field}' is missing")
        if not isinstance(rec[field], str):
            fail(f"field '{field}' must be a string, got {type(rec[field]).__name__}")
        out[field] = rec[field]
    if not out["instruction"].strip():
        fail("field 'instruction' is empty")
    inp = rec.get("input")
    if inp is not None and not isinstance(inp, str):
        fail(f"field 'input' must be a string or absent, got {type(inp).__name__}")
    out["input"] = inp or ""
    history = rec.get("history")
    history = [] if history is None else history
    if not isinstance(history, list) or not all(
            isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history):
        fail("field 'history' must be a list of [question, answer] string pairs")
    out["history"] = [list(h) for h in history]
    for text in (out["instruction"], out["input"], out["output"], *(x for h in history for x in h)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            fail("holds a lone UTF-16 surrogate escape (e.g. \\ud800), which is not valid text")
    return out


def _type_name(value):
    return "null" if value is None else type(value).__name__


def detect_format(path, where, rec):
    """The format of one record from its fields; a record with the fields of two formats is an error."""
    if not isinstance(rec, dict):
        raise UserError(f"{path}: {where}: expected an object (an Alpaca record, or one with 'conversations' or "
                        f"'messages'), got {_type_name(rec)}")
    found = [fmt for fmt, fields in FORMAT_FIELDS.items() if any(rec.get(f) is not None for f in fields)]
    if len(found) > 1:
        fields = ", ".join(f"'{f}'" for fmt in found for f in FORMAT_FIELDS[fmt] if rec.get(f) is not None)
        raise UserError(f"{path}: {where}: mixes the {' and '.join(found)} formats (fields {fields}); "
                        "a record must be in one format")
    return found[0] if found else None


def _conversation_messages(path, where, rec, fmt):
    """A ShareGPT or messages record as messages. Returns (messages, dropped_trailing_user_turn)."""
    field, role_key, text_key, roles = TURN_SCHEMA[fmt]
    turns = rec.get(field)
    if turns is None:
        raise UserError(f"{path}: {where}: field '{field}' is missing")
    if not isinstance(turns, list):
        raise UserError(f"{path}: {where}: field '{field}' must be a list of turns, got {_type_name(turns)}")
    if not turns:
        raise UserError(f"{path}: {where}: field '{field}' is empty (a conversation needs turns)")
    messages = []
    for i, turn in enumerate(turns):
        def fail(msg, i=i):
            raise UserError(f"{path}: {where}: turn {i}: {msg}")

        if not isinstance(turn, dict):
            fail(f"expected an object with '{role_key}' and '{text_key}', got {_type_name(turn)}")
        if turn.get(role_key) is None:
            other = next((f for f, schema in TURN_SCHEMA.items() if f != fmt and schema[1] in turn), None)
            hint = f" (it has '{TURN_SCHEMA[other][1]}': a {other}-format turn in a {fmt} record)" if other else ""
            fail(f"field '{role_key}' is missing{hint}")
        raw_role = turn[role_key]
        role = roles.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            fail(f"unknown role {raw_role!r} in '{role_key}'; use one of {', '.join(roles)}")
        text = turn.get(text_key)
        if not isinstance(text, str):
            fail(f"field '{text_key}' must be a string, got {_type_name(text)}")
        position = len(messages) - (1 if messages and messages[0]["role"] == "system" else 0)
        if role == "system":
            if i != 0:
                fail(f"a system turn ({raw_role!r}) may only come first")
            if text.strip():  # an empty system text is the same as none
                messages.append({"role": "system", "content": text})
            continue
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            fail(f"expected {'a user' if expected == 'user' else 'an assistant'} turn, got {raw_role!r}: after an "
                 "optional system turn, turns alternate user, assistant, user, ...")
        if role == "user" and not text.strip():
            fail(f"field '{text_key}' of a user turn is empty")
        messages.append({"role": role, "content": text})
    trailing_user = bool(messages) and messages[-1]["role"] == "user"
    if trailing_user:  # nothing to learn from a question without its answer
        messages.pop()
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{path}: {where}: the conversation has no assistant turn (nothing to learn)")
    return messages, trailing_user


def load_file(path, data_format="auto", log=print):
    """Read and validate one data file. Returns (conversations, format): each conversation a list of messages.
    Conversations with an empty answer are dropped and counted, and so are trailing user turns; duplicates are
    counted (kept: repeating a record is a legitimate way to up-weight it)."""
    rows = read_records(path)
    fmt = data_format
    if fmt == "auto" and rows:
        where, first = rows[0]
        fmt = detect_format(path, where, first)
        if fmt is None:
            raise UserError(f"{path}: {where}: cannot tell the data format: expected 'instruction' and 'output' "
                            "(Alpaca), 'conversations' (ShareGPT) or 'messages'; or pass --data_format")
    how = "detected from its first record" if data_format == "auto" else "--data_format"
    conversations, empty, trailing = [], 0, 0
    for where, rec in rows:
        found = detect_format(path, where, rec)
        if found is not None and found != fmt:
            raise UserError(f"{path}: {where}: a {found} record, but the file is in {fmt} format ({how}); "
                            "use one format per file")
        if fmt == "alpaca":
            messages = record_to_messages(_check_record(path, where, rec))
        else:
            messages, cut = _conversation_messages(path, where, rec, fmt)
            trailing += cut
        if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
            empty += 1
            continue
        conversations.append(messages)
    if trailing:
        log(f"warning: {path}: dropped the trailing user turn (a question without an answer) of {trailing} "
            "record(s)")
    if empty:
        log(f"warning: {path}: dropped {empty} record(s) with an empty answer (nothing to learn)")
    if not conversations:
        raise UserError(f"{path}: no usable records (the dataset is empty)")
    dupes = sum(n - 1 for n in Counter(json.dumps(c, sort_keys=True) for c in conversations).values() if n > 1)
    if dupes:
        log(f"warning: {path}: {dupes} duplicate record(s) kept (they count twice in the loss)")
    return conversations, fmt


def load_dataset(paths, data_format="auto", log=print):
    """Every record of every file (one path or a list), validated, as conversations (lists of messages).
    Returns (conversations, files): files lists {"path", "format", "records"} for the report and the record."""
    conversations, files = [], []
    for path in [paths] if isinstance(paths, str) else paths:
        convs, fmt = load_file(path, data_format, log)
        log(f"data: {path}: {len(convs)} records ({fmt})")
        conversations += convs
        files.append({"path": path, "format": fmt, "records": len(convs)})
    return conversations, files


class TokenizedDataset(torch.utils.data.Dataset):
    """Records rendered with the template and tokenized once, up front."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def tokenize_records(conversations, tokenizer, template, cutoff_len, train_on_inputs=False, overlong="truncate",
                     log=print):
    """Encode conversations; a conversation longer than cutoff_len tokens is cut to it (overlong='truncate') or
    left out (overlong='drop'); one left with no target token is always left out. Logs the token lengths
    (before the cutoff) and the counts."""
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    examples, lengths, truncated, dropped, no_target = [], [], 0, 0, 0
    for messages in conversations:
        ids, labels = encode_conversation(tokenizer, template, messages, train_on_inputs=train_on_inputs)
        lengths.append(len(ids))
        if len(ids) > cutoff_len:
            if overlong == "drop":
                dropped += 1
                continue
            ids, labels = ids[:cutoff_len], labels[:cutoff_len]
            if all(label == IGNORE_INDEX for label in labels):
                no_target += 1
                continue
            truncated += 1
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if not lengths:
        raise UserError("no records to tokenize")
    p50, p90, p99 = (percentile(lengths, q) for q in (50, 90, 99))
    log(f"data: {len(lengths)} records, tokens per record p50 {p50}, p90 {p90}, p99 {p99}, max {max(lengths)}; "
        f"{truncated + dropped + no_target} longer than --cutoff_len {cutoff_len}")
    if truncated:
        log(f"warning: {truncated} record(s) longer than --cutoff_len {cutoff_len} tokens were truncated")
    if dropped:
        log(f"warning: dropped {dropped} record(s) longer than --cutoff_len {cutoff_len} tokens (--overlong drop)")
    if no_target:
        log(f"warning: dropped {no_target} record(s) whose answers lie entirely beyond --cutoff_len {cutoff_len}")
    if not examples:
        fix = "raise --cutoff_len" + (" or pass --overlong truncate" if overlong == "drop" else "")
        raise UserError(f"no record has answer tokens within --cutoff_len {cutoff_len}; {fix}")
    return examples


def percentile(values, q):
    """The nearest-rank q-th percentile: the smallest value that at least q% of the values do not exceed."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def split_train_val(records, val_set_size, seed):
    """Hold out `val_set_size` records or examples (a count, or a fraction when < 1) for evaluation."""
    if not val_set_size:
        return records, []
    n_val = int(round(val_set_size * len(records))) if val_set_size < 1 else int(val_set_size)
    if n_val >= len(records):
        raise UserError(f"--val_set_size {val_set_size} leaves no training records (dataset has {len(records)})")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val], [records[i] for i in sorted(val)]


def pad_collate(tokenizer, pad_to_multiple_of=8):
    """Right-pad a batch; padding positions get attention 0 and label -100 (never in the loss)."""
    pad_id = tokenizer.pad_token_id

    def collate(batch):
        longest = max(len(b["input_ids"]) for b in batch)
        if pad_to_multiple_of:
            longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for b in batch:
            n = longest - len(b["input_ids"])
            out["input_ids"].append(b["input_ids"] + [pad_id] * n)
            out["attention_mask"].append(b["attention_mask"] + [0] * n)
            out["labels"].append(b["labels"] + [IGNORE_INDEX] * n)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}

    return collate

"""Instruction data: read and validate Alpaca-style JSON / JSONL, then tokenize with the prompt template.

Every problem names the file, the record (0-based index, or line number for JSONL) and the field, and is
raised before any model is loaded.
"""

import json
import os
import random
from collections import Counter

import torch

from utils.args import UserError
from utils.prompts import IGNORE_INDEX, encode_conversation, record_to_messages


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
    """A JSON list of objects, or JSON Lines (one object per line; blank lines skipped).
    Returns [(where, record)] where `where` names the record for error messages."""
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


def _check_record(path, where, rec):
    """Return the record normalised ({instruction, input, output, history}), or raise naming the field."""
    def fail(msg):
        raise UserError(f"{path}: {where}: {msg}")

    if not isinstance(rec, dict):
        fail(f"expected an object with 'instruction' and 'output', got {type(rec).__name__}")
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


def load_dataset(path, log=print):
    """Read and validate every record; returns the normalised records. Empty answers are dropped and
    counted; duplicates are counted (kept: repeating a record is a legitimate way to up-weight it)."""
    records, empty = [], 0
    for where, rec in read_records(path):
        rec = _check_record(path, where, rec)
        if not rec["output"].strip():
            empty += 1
            continue
        records.append(rec)
    if empty:
        log(f"warning: {path}: dropped {empty} record(s) with an empty 'output' (nothing to learn)")
    if not records:
        raise UserError(f"{path}: no usable records (the dataset is empty)")
    dupes = sum(n - 1 for n in Counter(json.dumps(r, sort_keys=True) for r in records).values() if n > 1)
    if dupes:
        log(f"warning: {path}: {dupes} duplicate record(s) kept (they count twice in the loss)")
    return records


class TokenizedDataset(torch.utils.data.Dataset):
    """Records rendered with the template and tokenized once, up front."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def tokenize_records(records, tokenizer, template, cutoff_len, train_on_inputs=False, log=print):
    """Encode records; truncate to cutoff_len tokens; drop (and count) records left with no target token."""
    examples, truncated, dropped = [], 0, 0
    for rec in records:
        ids, labels = encode_conversation(tokenizer, template, record_to_messages(rec),
                                          train_on_inputs=train_on_inputs)
        if len(ids) > cutoff_len:
            truncated += 1
            ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if truncated:
        log(f"warning: {truncated} record(s) longer than --cutoff_len {cutoff_len} tokens were truncated")
    if dropped:
        log(f"warning: dropped {dropped} record(s) whose answer lies entirely beyond --cutoff_len {cutoff_len}")
    if not examples:
        raise UserError(f"no record has answer tokens within --cutoff_len {cutoff_len}; raise --cutoff_len")
    return examples


def split_train_val(records, val_set_size, seed):
    """Hold out `val_set_size` records (a count, or a fraction when < 1) for evaluation."""
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

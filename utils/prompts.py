"""Prompt templates: the one place where a conversation becomes token ids and loss labels.

Training (`encode_conversation` with the answer) and chat (`encode_conversation` with
`add_generation_prompt=True`) call the same renderer, so train and inference prompts cannot drift.
Templates are JSON files in utils/templates/ (schema in utils/templates/README.md), or the tokenizer's own
chat template.
"""

import json
import os
import re
from dataclasses import dataclass

from utils.args import UserError

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
TOKENIZER_TEMPLATE = "tokenizer"
IGNORE_INDEX = -100
_KEYS = {"description", "system", "system_input", "system_format", "system_in_user", "prompt_no_input",
         "prompt_input", "answer_prefix", "turn_separator"}
_FLAGS = {"system_in_user"}  # booleans; every other key is a string


@dataclass
class Template:
    name: str
    data: dict  # empty for the tokenizer's own chat template

    @property
    def uses_tokenizer(self):
        return self.name == TOKENIZER_TEMPLATE


def builtin_template_names():
    return sorted(f[:-5] for f in os.listdir(TEMPLATE_DIR) if f.endswith(".json")) + [TOKENIZER_TEMPLATE, "auto"]


def validate_template(data, where):
    if not isinstance(data, dict):
        raise UserError(f"template {where}: expected a JSON object")
    problems = [f"unknown key '{k}'" for k in data if k not in _KEYS]
    for key in sorted(_KEYS & data.keys()):
        if key in _FLAGS and not isinstance(data[key], bool):
            problems.append(f"'{key}' must be true or false")
        elif key not in _FLAGS and not isinstance(data[key], str):
            problems.append(f"'{key}' must be a string")
    for key, needed in (("prompt_no_input", ["{instruction}"]), ("prompt_input", ["{instruction}", "{input}"])):
        if key not in data:
            problems.append(f"'{key}' is missing")
        elif isinstance(data[key], str):
            problems += [f"'{key}' lacks {p}" for p in needed if p not in data[key]]
    if (data.get("system") or data.get("system_input")) and "{system}" not in str(data.get("system_format", "")):
        problems.append("'system_format' must contain {system} when a default system text is given")
    if problems:
        raise UserError(f"template {where}: " + "; ".join(problems))
    return data


def load_template(name_or_path, tokenizer=None):
    """'alpaca', 'chat', 'tokenizer', 'auto', a .json path, or a dict recorded in an adapter's metadata."""
    if isinstance(name_or_path, dict):  # recorded with an adapter: {"name": ..., "data": {...}}
        if name_or_path.get("name") == TOKENIZER_TEMPLATE:
            return load_template(TOKENIZER_TEMPLATE, tokenizer)
        return Template(name_or_path["name"], validate_template(name_or_path["data"], name_or_path["name"]))
    name = name_or_path or "auto"
    if name == "auto":
        name = TOKENIZER_TEMPLATE if tokenizer is not None and tokenizer.chat_template else "alpaca"
    if name == TOKENIZER_TEMPLATE:
        if tokenizer is None or not tokenizer.chat_template:
            raise UserError("prompt template 'tokenizer' asked for, but this tokenizer has no chat template; "
                            f"use one of {', '.join(builtin_template_names()[:-2])}")
        return Template(TOKENIZER_TEMPLATE, {})
    path = name if name.endswith(".json") else os.path.join(TEMPLATE_DIR, name + ".json")
    if not os.path.isfile(path):
        raise UserError(f"unknown prompt template '{name}': use one of {', '.join(builtin_template_names())} "
                        "or a path to a .json template")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"template {path}: not valid JSON ({e})") from None
    label = name if path.startswith(TEMPLATE_DIR) else os.path.basename(path)[:-5]
    return Template(label, validate_template(data, path))


def template_record(template):
    """What an adapter stores so merge/chat can rebuild the exact template without the original file."""
    return {"name": template.name, "data": template.data}


# ---------------------------------------------------------------------------------------------------------
# Conversations
# ---------------------------------------------------------------------------------------------------------

def record_to_messages(record):
    """An Alpaca record (with optional `history` of [question, answer] pairs) as a list of messages."""
    messages = []
    for question, answer in record.get("history") or []:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": record["instruction"], "input": record.get("input") or ""})
    if record.get("output") is not None:
        messages.append({"role": "assistant", "content": record["output"]})
    return messages


def history_to_messages(history, query, system=None):
    """Chat history as [(user, assistant), ...] plus the new query."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": query})
    return messages


def render_segments(template, messages, tokenizer=None, add_generation_prompt=False):
    """Return [(text, is_target, eos_after)]: the conversation as text pieces, answers marked as targets."""
    if template.uses_tokenizer:
        return _render_with_tokenizer(tokenizer, messages, add_generation_prompt)
    t = template.data
    # {bos} / {eos} in a template are the tokenizer's own special-token texts (empty without a tokenizer)
    special = {"bos": getattr(tokenizer, "bos_token", None) or "", "eos": getattr(tokenizer, "eos_token", None) or ""}
    segments = []
    turns = list(messages)
    system = None
    if turns and turns[0]["role"] == "system":
        system = turns.pop(0)["content"]
    if system is None:
        first_user = next((m for m in turns if m["role"] == "user"), {})
        system = t.get("system_input", t.get("system", "")) if first_user.get("input") else t.get("system", "")
    system_text = _fill(t.get("system_format", "{system}\n\n"), dict(special, system=system)) if system else ""
    if system_text and not t.get("system_in_user"):
        segments.append((system_text, False, False))
    for i, m in enumerate(turns):
        if m["role"] == "user":
            instruction = m["content"]
            if system_text and t.get("system_in_user"):  # Llama-2: <<SYS>> opens the first instruction
                instruction, system_text = system_text + instruction, ""
            values = dict(special, instruction=instruction, input=m.get("input") or "")
            text = _fill(t["prompt_input" if values["input"] else "prompt_no_input"], values)
            segments.append((text, False, False))
        elif m["role"] == "assistant":
            # the answer prefix is in the loss: a word-start space belongs to the answer's first token
            segments.append((_fill(t.get("answer_prefix", ""), special) + m["content"], True, True))
            if i + 1 < len(turns) and t.get("turn_separator"):
                segments.append((_fill(t["turn_separator"], special), False, False))
        else:
            raise ValueError(f"unexpected role {m['role']!r}")
    return segments


def _fill(pattern, values):
    """Replace {name} placeholders in one pass, so braces inside the user's own text stay literal."""
    return re.sub(r"\{(" + "|".join(values) + r")\}", lambda m: values[m[1]], pattern)


def _plain(messages):
    """Fold an Alpaca `input` into the user text for chat templates that have no slot for it."""
    return [{"role": m["role"], "content": m["content"] + ("\n\n" + m["input"] if m.get("input") else "")}
            for m in messages]


def _render_with_tokenizer(tokenizer, messages, add_generation_prompt):
    """Cut the chat template's rendering at each assistant turn: the text up to the generation prompt is
    context, the assistant's rendered turn (its end-of-turn token included) is the target."""
    messages = _plain(messages)

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix, full = render(messages[:i], True), render(messages[:i + 1], False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise UserError("the tokenizer's chat template does not render conversations incrementally, so "
                            "answers cannot be located for the loss mask; pass --prompt_template alpaca or chat")
        segments += [(prefix[len(done):], False, False), (full[len(prefix):], True, False)]
        done = full
    if add_generation_prompt or not segments:
        rest = render(messages, add_generation_prompt)
        if not rest.startswith(done):
            raise UserError("the tokenizer's chat template rewrites earlier turns; pass --prompt_template chat")
        segments.append((rest[len(done):], False, False))
    return [s for s in segments if s[0]]


def _special_prefix(tokenizer):
    """Token ids the tokenizer puts before any text (BOS for LLaMA's SentencePiece tokenizer)."""
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_sp) - len(without) + 1):
        if with_sp[start:start + len(without)] == without:
            return with_sp[:start]
    return []


def _tokenize_segments(tokenizer, segments):
    """[(ids, is_target)] for the segments.

    The text is tokenized whole and tokens are assigned to segments by character offsets, so a SentencePiece
    tokenizer does not add its word-start space to every piece. The context before each answer, though, comes
    from a tokenization that ends where the answer starts, as the chat prompt for that answer does: a BPE
    tokenizer may split the end of a prompt differently when text follows (GPT-2-style BPE reads "\n\n" + "Hi"
    as "\n", "\n", "Hi" but a prompt ending in "\n\n" as one token), and the model must learn to answer the
    prompt it will be given. Tokenizers without offsets (slow ones) fall back to one call per segment."""
    texts = [text + (tokenizer.eos_token if eos_after else "") for text, _, eos_after in segments]
    bounds, end = [], 0
    for t in texts:
        end += len(t)
        bounds.append(end)
    full = "".join(texts)
    answer_starts = {bounds[k - 1] for k, (_, is_target, _) in enumerate(segments) if is_target and k > 0}
    try:
        tokens, done = [], 0
        for cut in sorted(answer_starts | {len(full)}):
            enc = tokenizer(full[:cut], add_special_tokens=False, return_offsets_mapping=True)
            spans = list(zip(enc["input_ids"], enc["offset_mapping"]))
            if any(s < done < e for _, (s, e) in spans):  # a token spans an answer's start: no clean cut
                enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
                tokens = list(zip(enc["input_ids"], enc["offset_mapping"]))
                break
            tokens += [(i, (s, e)) for i, (s, e) in spans if s >= done]
            done = cut
    except (NotImplementedError, TypeError, ValueError):
        return [(tokenizer(t, add_special_tokens=False)["input_ids"], target)
                for t, (_, target, _) in zip(texts, segments)]
    pieces = [([], seg[1]) for seg in segments]
    k = 0
    for token_id, (start, _) in tokens:  # each token goes to the segment its first character is in
        while k < len(bounds) - 1 and start >= bounds[k]:
            k += 1
        pieces[k][0].append(token_id)
    return pieces


def encode_conversation(tokenizer, template, messages, *, add_generation_prompt=False, train_on_inputs=False):
    """Token ids and labels (-100 where masked) for a conversation. Every answer ends in EOS, which is
    kept in the loss so that the model learns to stop (pitfall 3)."""
    segments = render_segments(template, messages, tokenizer, add_generation_prompt)
    ids = list(_special_prefix(tokenizer))
    if ids and segments and tokenizer.bos_token and segments[0][0].startswith(tokenizer.bos_token):
        ids = []  # the chat template writes its own BOS
    labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(ids)
    eos = tokenizer.eos_token_id
    for piece, is_target in _tokenize_segments(tokenizer, segments):
        if is_target and eos not in piece:  # e.g. a chat template whose end-of-turn token is not EOS
            piece = piece + [eos]
        ids += piece
        labels += piece if (is_target or train_on_inputs) else [IGNORE_INDEX] * len(piece)
    return ids, labels

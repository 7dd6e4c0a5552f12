"""Exact strings and exact ids for prompt templates and loss masks (utils/prompts.py, build_chat_prompt).

Tokenizers used: the bundled SmolLM2 (byte-level BPE with a ChatML chat template, pad != eos) and a tiny
LLaMA-style SentencePiece model trained on the sample data (conftest.py: BOS added by the tokenizer, no pad
token, byte fallback).
"""

import json
import shutil

import pytest

from utils.args import UserError
from utils.generation import build_chat_prompt
from utils.prompts import (
    IGNORE_INDEX,
    encode_conversation,
    history_to_messages,
    load_template,
    record_to_messages,
    render_segments,
)

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nName a primary colour.\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:\n"
)
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def render(template, record_or_messages, tokenizer=None, add_generation_prompt=False):
    messages = record_or_messages
    if isinstance(record_or_messages, dict):
        messages = record_to_messages(record_or_messages)
    segments = render_segments(template, messages, tokenizer, add_generation_prompt)
    return "".join(text for text, _, _ in segments)


def targets(ids, labels):
    """The token ids that are in the loss, in order."""
    return [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]


def target_runs(labels):
    """Contiguous (start, end) spans of unmasked labels."""
    runs, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def smol():
    from utils.modeling import load_tokenizer, resolve_model_path
    return load_tokenizer(resolve_model_path("smollm2-135m"))


@pytest.fixture(scope="module")
def alpaca():
    return load_template("alpaca")


# ---------------------------------------------------------------------------------------------------------
# Alpaca and chat templates: exact text
# ---------------------------------------------------------------------------------------------------------

def test_alpaca_without_input_is_stanford_text(alpaca):
    assert render(alpaca, {"instruction": "Name a primary colour.", "output": None}) == ALPACA_NO_INPUT


def test_alpaca_with_input_is_stanford_text(alpaca):
    record = {"instruction": "Translate to French.", "input": "Good morning", "output": None}
    assert render(alpaca, record) == ALPACA_INPUT


@pytest.mark.parametrize("record", [
    {"instruction": "Name a primary colour.", "output": None},
    {"instruction": "Name a primary colour.", "input": None, "output": None},
    {"instruction": "Name a primary colour.", "input": "", "output": None},
], ids=["missing", "None", "empty"])
def test_alpaca_missing_input_never_renders_none_nor_input_block(alpaca, record):
    text = render(alpaca, record)
    assert text == ALPACA_NO_INPUT
    assert "None" not in text and "### Input" not in text and "paired with an input" not in text


def test_alpaca_with_answer_appends_it_after_response(alpaca):
    record = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    assert render(alpaca, record) == ALPACA_INPUT + "Bonjour"


def test_chat_template_multi_turn_exact():
    record = {"instruction": "And 3+3?", "output": "6.",
              "history": [["What is 2+2?", "4."], ["Thanks!", "You're welcome."]]}
    assert render(load_template("chat"), record) == (
        "The following is a conversation between an AI assistant called Assistant and a human user called User. "
        "The assistant is intelligent, knowledgeable and polite to answer questions of user.\n\n"
        "User:What is 2+2?\n\nAssistant:4.\n\n"
        "User:Thanks!\n\nAssistant:You're welcome.\n\n"
        "User:And 3+3?\n\nAssistant:6."
    )


def test_chat_template_with_input_and_generation_prompt():
    record = {"instruction": "Summarise:", "input": "A long text.", "output": None}
    assert render(load_template("chat"), record).endswith("\n\nUser:Summarise:\nA long text.\n\nAssistant:")


def test_explicit_system_message_replaces_default(alpaca):
    messages = history_to_messages([], "Hi", system="Be brief.")
    assert render(alpaca, messages) == "Be brief.\n\n### Instruction:\nHi\n\n### Response:\n"


# ---------------------------------------------------------------------------------------------------------
# Template loading errors and literal substitution
# ---------------------------------------------------------------------------------------------------------

GOOD = {"prompt_no_input": "Q: {instruction}\nA:", "prompt_input": "Q: {instruction}\n{input}\nA:"}


def write_template(tmp_path, content, name="mine.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


def test_unknown_template_name_lists_the_choices():
    with pytest.raises(UserError) as e:
        load_template("alpacca")
    assert "unknown prompt template 'alpacca'" in str(e.value)
    assert "alpaca" in str(e.value).split(":", 1)[1] and "chat" in str(e.value)


def test_template_missing_prompt_input(tmp_path):
    path = write_template(tmp_path, {"prompt_no_input": GOOD["prompt_no_input"]})
    with pytest.raises(UserError, match="'prompt_input' is missing") as e:
        load_template(path)
    assert path in str(e.value)


def test_template_missing_instruction_placeholder(tmp_path):
    path = write_template(tmp_path, dict(GOOD, prompt_no_input="Q:\nA:"))
    with pytest.raises(UserError, match=r"'prompt_no_input' lacks \{instruction\}"):
        load_template(path)


def test_template_invalid_json(tmp_path):
    path = write_template(tmp_path, '{"prompt_no_input": "Q: {instruction}",')
    with pytest.raises(UserError, match="not valid JSON") as e:
        load_template(path)
    assert path in str(e.value)


def test_template_unknown_key_and_non_string(tmp_path):
    path = write_template(tmp_path, dict(GOOD, prompt_inptu="x", system=3))
    with pytest.raises(UserError) as e:
        load_template(path)
    assert "unknown key 'prompt_inptu'" in str(e.value) and "'system' must be a string" in str(e.value)


def test_tokenizer_template_without_chat_template_is_refused(llama_sp):
    with pytest.raises(UserError, match="no chat template"):
        load_template("tokenizer", llama_sp)


def test_custom_template_loads_and_is_named_after_file(tmp_path):
    template = load_template(write_template(tmp_path, GOOD))
    assert template.name == "mine"
    assert render(template, {"instruction": "x", "output": None}) == "Q: x\nA:"


@pytest.mark.parametrize("instruction", ["Explain {} in Python", "Use {instruction} here", "f'{x}' {{y}} {0}"])
def test_braces_in_instruction_without_input_are_literal(alpaca, instruction):
    text = render(alpaca, {"instruction": instruction, "output": None})
    assert f"### Instruction:\n{instruction}\n\n### Response:\n" in text


def test_braces_in_input_are_literal(alpaca):
    text = render(alpaca, {"instruction": "Format it", "input": "{instruction} and {input} and {}", "output": None})
    assert "### Instruction:\nFormat it\n\n### Input:\n{instruction} and {input} and {}\n\n" in text


def test_input_placeholder_inside_instruction_is_literal(alpaca):
    text = render(alpaca, {"instruction": "Fill the {input} slot", "input": "SECRET", "output": None})
    assert "### Instruction:\nFill the {input} slot\n\n### Input:\nSECRET\n\n" in text


def test_system_text_with_template_lacking_system_format(tmp_path):
    template = load_template(write_template(tmp_path, GOOD))
    try:
        text = render(template, history_to_messages([], "Hi", system="Be brief."))
    except UserError:
        return  # refusing with a clear message is a fine fix too
    assert "Be brief." in text


# ---------------------------------------------------------------------------------------------------------
# The tokenizer's chat template (SmolLM2, ChatML)
# ---------------------------------------------------------------------------------------------------------

def test_smol_pad_is_not_eos(smol):
    assert smol.eos_token == "<|im_end|>"
    assert smol.pad_token_id is not None and smol.pad_token_id != smol.eos_token_id
    assert load_template("auto", smol).name == "tokenizer"


def test_smol_tokenizer_template_exact_text_and_ids(smol):
    template = load_template("tokenizer", smol)
    record = {"instruction": "Hi", "output": "Hello!"}
    assert render(template, record, smol) == (
        SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n")
    ids, labels = encode_conversation(smol, template, record_to_messages(record))
    assert ids == [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
                   19712, 8182, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198, 19556, 17, 2, 198]
    # the answer, its end-of-turn token (= EOS) and the newline the template writes after it
    assert labels == [IGNORE_INDEX] * 31 + [19556, 17, 2, 198]
    assert smol.decode(targets(ids, labels)) == "Hello!<|im_end|>\n"
    assert smol.eos_token_id in targets(ids, labels)
    assert ids == enc(smol, render(template, record, smol))  # pieces tokenize like the whole text


def test_smol_tokenizer_template_generation_prompt_is_prefix_of_training_ids(smol):
    template = load_template("tokenizer", smol)
    record = {"instruction": "Hi", "output": "Hello!", "history": [["Who are you?", "A model."]]}
    train_ids, _ = encode_conversation(smol, template, record_to_messages(record))
    prompt_ids, _ = encode_conversation(smol, template, history_to_messages([("Who are you?", "A model.")], "Hi"),
                                                    add_generation_prompt=True)
    assert smol.decode(prompt_ids).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert train_ids[:len(prompt_ids)] == prompt_ids


def test_smol_tokenizer_template_every_turn_is_a_target(smol):
    template = load_template("tokenizer", smol)
    record = {"instruction": "Q3", "output": "A3", "history": [["Q1", "A1"], ["Q2", "A2"]]}
    ids, labels = encode_conversation(smol, template, record_to_messages(record))
    runs = target_runs(labels)
    assert [smol.decode(ids[a:b]) for a, b in runs] == ["A1<|im_end|>\n", "A2<|im_end|>\n", "A3<|im_end|>\n"]
    assert smol.decode([i for i, label in zip(ids, labels) if label == IGNORE_INDEX]) == (
        SMOL_SYSTEM + "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\nQ3<|im_end|>\n<|im_start|>assistant\n")


def test_smol_tokenizer_template_folds_input_into_user_turn(smol):
    template = load_template("tokenizer", smol)
    text = render(template, {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}, smol)
    assert "<|im_start|>user\nTranslate.\n\nBonjour<|im_end|>\n" in text


# ---------------------------------------------------------------------------------------------------------
# encode_conversation with the alpaca template on SmolLM2
# ---------------------------------------------------------------------------------------------------------

def test_alpaca_encoding_masks_prompt_and_keeps_answer_plus_eos(smol, alpaca):
    record = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    ids, labels = encode_conversation(smol, alpaca, record_to_messages(record))
    # the rendered text is tokenized in one piece, exactly as at inference the prompt is a prefix of it
    full, prompt = enc(smol, ALPACA_INPUT + "Bonjour"), enc(smol, ALPACA_INPUT)
    assert full[:len(prompt)] == prompt and smol.decode(prompt) == ALPACA_INPUT
    answer = full[len(prompt):]
    assert smol.decode(answer) == "Bonjour"
    assert ids == full + [smol.eos_token_id]
    assert labels == [IGNORE_INDEX] * len(prompt) + answer + [smol.eos_token_id]
    assert ids[-1] == smol.eos_token_id != smol.pad_token_id


def test_alpaca_train_on_inputs_labels_equal_ids(smol, alpaca):
    record = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    ids, labels = encode_conversation(smol, alpaca, record_to_messages(record), train_on_inputs=True)
    assert labels == ids
    assert ids[-1] == smol.eos_token_id


def test_alpaca_multi_turn_every_answer_is_a_target_and_separator_masked(smol, alpaca):
    record = {"instruction": "Q3", "output": "A3", "history": [["Q1", "A1"], ["Q2", "A2"]]}
    ids, labels = encode_conversation(smol, alpaca, record_to_messages(record))
    eos = smol.eos_token_id
    runs = target_runs(labels)
    assert [smol.decode(ids[a:b]) for a, b in runs] == [f"A{i}{smol.eos_token}" for i in (1, 2, 3)]
    assert all(ids[b - 1] == eos for _, b in runs)
    for _, end in runs[:-1]:  # after each non-final answer: the separator, masked
        assert smol.decode(ids[end:]).startswith("\n\n### Instruction:")
        assert labels[end] == IGNORE_INDEX
    assert runs[-1][1] == len(ids)


def test_alpaca_generation_prompt_is_prefix_of_training_ids(smol, alpaca):
    record = {"instruction": "Q2", "output": "A2", "history": [["Q1", "A1"]]}
    train_ids, _ = encode_conversation(smol, alpaca, record_to_messages(record))
    prompt_ids, _ = encode_conversation(smol, alpaca, history_to_messages([("Q1", "A1")], "Q2"),
                                        add_generation_prompt=True)
    assert train_ids[:len(prompt_ids)] == prompt_ids
    assert train_ids[len(prompt_ids):] == enc(smol, "A2") + [smol.eos_token_id]


# ---------------------------------------------------------------------------------------------------------
# A LLaMA-style SentencePiece tokenizer: BOS added by the tokenizer, no pad token
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_sp(llama_sp_dir):
    from utils.modeling import load_tokenizer
    return load_tokenizer(str(llama_sp_dir))


def test_llama_sp_tokenizer_shape(llama_sp):
    assert type(llama_sp).__name__ == "LlamaTokenizer"
    assert (llama_sp.unk_token_id, llama_sp.bos_token_id, llama_sp.eos_token_id) == (0, 1, 2)
    assert llama_sp("hello")["input_ids"][0] == 1  # LLaMA-style: the tokenizer itself adds BOS
    assert not llama_sp.chat_template


def test_llama_sp_pad_policy_gives_pad_not_eos(llama_sp):
    # no pad in the model file: load_tokenizer picks one that is not EOS (here <unk>)
    assert llama_sp.pad_token_id is not None
    assert llama_sp.pad_token_id != llama_sp.eos_token_id
    assert llama_sp.pad_token == "<unk>"
    assert llama_sp.padding_side == "right"
    assert len(llama_sp) == 1000  # no token was added, so no embedding resize is needed


def test_llama_sp_encoding_one_bos_first_eos_after_answer(llama_sp):
    template = load_template("auto", llama_sp)
    assert template.name == "alpaca"
    bos, eos = llama_sp.bos_token_id, llama_sp.eos_token_id
    record = {"instruction": "hello world", "input": "the fox", "output": "quick brown dog"}
    ids, labels = encode_conversation(llama_sp, template, record_to_messages(record))
    (start, end), = target_runs(labels)
    assert ids[0] == bos and ids.count(bos) == 1
    assert end == len(ids) and ids[-1] == eos and ids.count(eos) == 1
    assert llama_sp.decode(ids[start:end - 1]) == "quick brown dog"
    assert labels[:start] == [IGNORE_INDEX] * start and labels[start:] == ids[start:]


def test_llama_sp_token_stream_is_the_rendered_text(llama_sp):
    template = load_template("alpaca")
    record = {"instruction": "hello world", "input": "the fox", "output": "quick brown dog"}
    ids, _ = encode_conversation(llama_sp, template, record_to_messages(record))
    special = {llama_sp.bos_token_id, llama_sp.eos_token_id}
    assert llama_sp.decode([i for i in ids if i not in special]) == render(template, record)


def test_llama_sp_multi_turn_bos_once_eos_after_each_answer(llama_sp):
    template = load_template("alpaca")
    record = {"instruction": "Q2", "output": "A2", "history": [["Q1", "A1"]]}
    ids, labels = encode_conversation(llama_sp, template, record_to_messages(record))
    eos = llama_sp.eos_token_id
    assert ids.count(llama_sp.bos_token_id) == 1 and ids[0] == llama_sp.bos_token_id
    runs = target_runs(labels)
    assert [llama_sp.decode(ids[a:b - 1]) for a, b in runs] == ["A1", "A2"]
    assert [ids[b - 1] for _, b in runs] == [eos, eos]


def test_llama_sp_train_on_inputs_keeps_bos_in_labels(llama_sp):
    ids, labels = encode_conversation(llama_sp, load_template("alpaca"),
                                      record_to_messages({"instruction": "hello", "output": "world"}),
                                      train_on_inputs=True)
    assert labels == ids and ids[0] == llama_sp.bos_token_id


def test_llama_sp_with_add_eos_token_still_gets_bos(llama_sp_dir, tmp_path):
    from utils.modeling import load_tokenizer
    shutil.copy(llama_sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": True}))
    tok = load_tokenizer(str(tmp_path))
    assert tok("hello")["input_ids"][0] == tok.bos_token_id  # the tokenizer does add BOS
    ids, _ = encode_conversation(tok, load_template("alpaca"),
                                 record_to_messages({"instruction": "hello", "output": "world"}))
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1


# ---------------------------------------------------------------------------------------------------------
# Every template, multi-turn with a system prompt, on both tokenizers: exact text, exact targets, and the chat
# prompt (history_to_messages, as cli_demo.py and gradio_ui.py build it) is the training ids up to the answer
# ---------------------------------------------------------------------------------------------------------

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"}]
# {bos} / {eos} stand for the tokenizer's own special tokens (<s> / </s>, or SmolLM2's <|im_start|> / <|im_end|>);
# the tokenizer's own leading BOS (LLaMA's) is not part of the rendered text
EXPECTED = {  # template -> (full text, target texts)
    "alpaca": ("Be brief.\n\n### Instruction:\nQ1\n\n### Response:\nA1{eos}\n\n"
               "### Instruction:\nQ2\n\n### Response:\nA2{eos}", ["A1{eos}", "A2{eos}"]),
    "chat": ("Be brief.\n\nUser:Q1\n\nAssistant:A1{eos}\n\nUser:Q2\n\nAssistant:A2{eos}", ["A1{eos}", "A2{eos}"]),
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n"
               "A1{eos}\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2{eos}", ["A1{eos}", "A2{eos}"]),
    "llama2": ("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nQ1 [/INST] A1{eos}{bos}[INST] Q2 [/INST] A2{eos}",
               [" A1{eos}", " A2{eos}"]),
    "llama3": ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nA1{eos}"
               "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nA2{eos}", ["A1{eos}", "A2{eos}"]),
    # SmolLM2's own chat template (tokenizer only): its end-of-turn is EOS, and the newline after it is a target
    "tokenizer": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
                  "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
                  "<|im_start|>assistant\nA2<|im_end|>\n", ["A1<|im_end|>\n", "A2<|im_end|>\n"]),
}
CASES = [(name, tok) for name in EXPECTED for tok in ("smol", "llama_sp") if (name, tok) != ("tokenizer", "llama_sp")]


def fill_special(text, tok):
    return text.replace("{bos}", tok.bos_token).replace("{eos}", tok.eos_token)


def full_text(template, messages, tok):
    """The rendered conversation as the model sees it: each answer's EOS included, the leading BOS not."""
    return "".join(text + (tok.eos_token if eos_after else "")
                   for text, _, eos_after in render_segments(template, messages, tok))


@pytest.mark.parametrize("name,tok_name", CASES)
def test_every_template_exact_text_and_mask(request, name, tok_name):
    tok = request.getfixturevalue(tok_name)
    template = load_template(name, tok)
    text, answers = EXPECTED[name]
    assert full_text(template, CONVERSATION, tok) == fill_special(text, tok)
    ids, labels = encode_conversation(tok, template, CONVERSATION)
    prefix = [tok.bos_token_id] if tok_name == "llama_sp" else []  # LLaMA's tokenizer adds BOS, SmolLM2's does not
    whole = prefix + enc(tok, fill_special(text, tok))  # one BOS, then the whole text in one tokenization
    if (name, tok_name) == ("llama3", "smol"):  # see test_context_before_an_answer_is_tokenized_as_a_prompt
        assert tok.decode(ids) == fill_special(text, tok) and len(ids) == len(whole) - 2
    else:
        assert ids == whole
    runs = target_runs(labels)
    assert [labels[a:b] for a, b in runs] == [ids[a:b] for a, b in runs]
    decoded = [tok.decode(ids[a:b]) for a, b in runs]
    if tok_name == "llama_sp":  # SentencePiece drops a word-start space when decoding from the first token
        assert decoded == [fill_special(answer, tok).lstrip(" ") for answer in answers]
        first_pieces = [tok.convert_ids_to_tokens(ids[a]) for a, _ in runs]
        assert all(piece.startswith("\u2581") == answers[0].startswith(" ") for piece in first_pieces), first_pieces
    else:
        assert decoded == [fill_special(answer, tok) for answer in answers]
    assert all(ids[b - 1] == tok.eos_token_id or (name == "tokenizer" and ids[b - 2] == tok.eos_token_id)
               for _, b in runs)

    # the chat scripts' prompt for the same history is exactly the training ids before the last answer
    prompt, _ = encode_conversation(tok, template, history_to_messages([("Q1", "A1")], "Q2", system="Be brief."),
                                    add_generation_prompt=True)
    assert prompt == ids[:runs[-1][0]]
    assert build_chat_prompt(tok, template, [("Q1", "A1")], "Q2", 10_000, system="Be brief.") == (prompt, 1)


def test_context_before_an_answer_is_tokenized_as_a_prompt(smol):
    """GPT-2-style BPE reads "\n\n" followed by text as two tokens, but a text ending in "\n\n" (the llama3
    template's chat prompt) as one. Training must show the model the prompt it will get in chat: the ids before
    each answer are those of the text up to the answer, not of the whole conversation."""
    nl, nlnl = enc(smol, "\n"), enc(smol, "\n\n")
    assert len(nl) == len(nlnl) == 1 and enc(smol, "\n\nA1") == nl + nl + enc(smol, "A1")
    ids, labels = encode_conversation(smol, load_template("llama3"), CONVERSATION)
    runs = target_runs(labels)
    assert [ids[a - 1] for a, _ in runs] == nlnl * 2  # the prompt's end, as in chat
    assert [smol.decode(ids[a:b]) for a, b in runs] == ["A1<|im_end|>", "A2<|im_end|>"]


INPUT_RECORD = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}
EXPECTED_WITH_INPUT = {  # no system text given: the template's default, if it has one
    "chat": ("The following is a conversation between an AI assistant called Assistant and a human user called User. "
             "The assistant is intelligent, knowledgeable and polite to answer questions of user.\n\n"
             "User:Translate.\nBonjour\n\nAssistant:Hello{eos}"),
    "chatml": "<|im_start|>user\nTranslate.\n\nBonjour<|im_end|>\n<|im_start|>assistant\nHello{eos}",
    "llama2": "[INST] Translate.\n\nBonjour [/INST] Hello{eos}",
    "llama3": ("<|start_header_id|>user<|end_header_id|>\n\nTranslate.\n\nBonjour<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello{eos}"),
}


@pytest.mark.parametrize("name", list(EXPECTED_WITH_INPUT))
def test_named_templates_with_input_and_no_system(llama_sp, name):
    template = load_template(name)
    text = full_text(template, record_to_messages(INPUT_RECORD), llama_sp)
    assert text == fill_special(EXPECTED_WITH_INPUT[name], llama_sp)


def test_llama2_system_goes_inside_the_first_instruction_only(llama_sp):
    messages = history_to_messages([("Q1", "A1"), ("Q2", "A2")], "Q3", system="S {input} {bos}")
    text = full_text(load_template("llama2"), messages, llama_sp)
    assert text == ("[INST] <<SYS>>\nS {input} {bos}\n<</SYS>>\n\nQ1 [/INST] A1</s><s>[INST] Q2 [/INST] A2</s>"
                    "<s>[INST] Q3 [/INST]")  # braces in the system text stay literal


@pytest.mark.parametrize("bad,message", [
    ({"system_in_user": "yes"}, "'system_in_user' must be true or false"),
    ({"answer_prefix": 1}, "'answer_prefix' must be a string"),
])
def test_template_flag_and_prefix_types(tmp_path, bad, message):
    with pytest.raises(UserError, match=message):
        load_template(write_template(tmp_path, dict(GOOD, **bad)))


def test_template_record_round_trip_keeps_new_keys(llama_sp):
    from utils.prompts import template_record
    for name in ("chatml", "llama2", "llama3"):
        template = load_template(name)
        again = load_template(json.loads(json.dumps(template_record(template))), llama_sp)
        assert (again.name, again.data) == (name, template.data)
        assert full_text(again, CONVERSATION, llama_sp) == full_text(template, CONVERSATION, llama_sp)


# ---------------------------------------------------------------------------------------------------------
# build_chat_prompt: the oldest turns go first
# ---------------------------------------------------------------------------------------------------------

HISTORY = [("First question?", "First answer."), ("Second question?", "Second answer."),
           ("Third question?", "Third answer.")]


def _prompt_len(tok, template, history, query):
    ids, _ = encode_conversation(tok, template, history_to_messages(history, query), add_generation_prompt=True)
    return ids


def test_build_chat_prompt_keeps_everything_when_it_fits(smol, alpaca):
    full = _prompt_len(smol, alpaca, HISTORY, "Now?")
    assert build_chat_prompt(smol, alpaca, HISTORY, "Now?", len(full)) == (full, 3)


def test_build_chat_prompt_drops_oldest_turns_first(smol, alpaca):
    last_two = _prompt_len(smol, alpaca, HISTORY[1:], "Now?")
    last_one = _prompt_len(smol, alpaca, HISTORY[2:], "Now?")
    assert build_chat_prompt(smol, alpaca, HISTORY, "Now?", len(last_two)) == (last_two, 2)
    ids, kept = build_chat_prompt(smol, alpaca, HISTORY, "Now?", len(last_two) - 1)
    assert (ids, kept) == (last_one, 1)
    text = smol.decode(ids)
    assert "Third answer." in text and "First" not in text and "Second" not in text
    assert text.endswith("### Instruction:\nNow?\n\n### Response:\n")


def test_build_chat_prompt_query_alone_too_long(smol, alpaca):
    alone = _prompt_len(smol, alpaca, [], "Now?")
    assert build_chat_prompt(smol, alpaca, HISTORY, "Now?", len(alone)) == (alone, 0)
    with pytest.raises(ValueError, match=f"{len(alone)} tokens long; the limit is {len(alone) - 1}"):
        build_chat_prompt(smol, alpaca, HISTORY, "Now?", len(alone) - 1)

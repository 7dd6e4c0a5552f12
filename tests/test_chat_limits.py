"""The input limits that the CLI and the web UI share (utils/chat.py: ChatModel.prompt_ids): the message must fit
--max_input_tokens, the oldest turns go until prompt + max_new_tokens fits the context, a long or hostile history
costs a few encodings, and an out-of-memory error ends one reply, not the session."""

import io
import random

import pytest

import cli_demo
from utils.generation import PromptTooLong, build_chat_prompt, context_length
from utils.prompts import encode_conversation, history_to_messages, load_template


@pytest.fixture(scope="module")
def chat(tiny_llama_dir):
    from utils.chat import load_chat_model

    args = cli_demo.parse_args(
        [
            "--model_path",
            tiny_llama_dir,
            "--num_gpus",
            "0",
            "--temperature",
            "0",
            "--max_new_tokens",
            "16",
            "--max_input_tokens",
            "40",
        ]
    )
    return load_chat_model(args, log=lambda msg: None)


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_a_message_over_max_input_tokens_is_refused(chat):
    tok = chat.tokenizer
    assert chat.max_input_tokens == 40
    fits, over = "hello " * 39 + "hello", "hello " * 40 + "hello"
    assert (n_tokens(tok, fits), n_tokens(tok, over)) == (40, 41)
    ids = chat.prompt_ids([], fits, 16)
    assert tok.decode(ids).endswith(fits + "<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(PromptTooLong, match=r"^the message is 41 tokens long; the limit is 40$"):
        chat.prompt_ids([], over, 16)


def test_a_huge_message_is_refused_without_tokenizing_it(chat, monkeypatch):
    tokenized = []
    real_call = type(chat.tokenizer).__call__
    monkeypatch.setattr(
        type(chat.tokenizer), "__call__", lambda self, *a, **k: tokenized.append(1) or real_call(self, *a, **k)
    )
    huge = "x" * (2 * 40 * chat.max_token_chars + 1)
    with pytest.raises(PromptTooLong, match=rf"^the message is {len(huge)} characters long; the limit is 40 tokens$"):
        chat.prompt_ids([], huge, 16)
    assert tokenized == []


def test_a_hostile_history_is_cut_to_the_context_in_a_few_encodings(chat, monkeypatch):
    import utils.generation

    ctx = context_length(chat.model, chat.tokenizer)
    history = [(f"question {i}", f"answer {i} " * 5) for i in range(20_000)]
    encodings = []
    real = utils.generation.encode_conversation
    monkeypatch.setattr(utils.generation, "encode_conversation", lambda *a, **k: encodings.append(1) or real(*a, **k))
    max_new = 200
    ids = chat.prompt_ids(history, "the question", max_new)
    text = chat.tokenizer.decode(ids)
    assert len(ids) + max_new <= ctx
    assert "question 19999" in text and "question 0<" not in text and text.count("question ") < 200
    assert len(encodings) <= 8, f"{len(encodings)} encodings"
    # the page shows the turns that could still reach the model, never all 20000
    shown = chat.recent_turns(history)
    assert shown == history[-len(shown) :] and len(shown) * chat.min_turn_tokens <= chat.max_prompt_tokens


@pytest.mark.parametrize("template_name", ["tokenizer", "alpaca", "chat"])
def test_turns_kept_are_the_most_that_fit(chat, template_name):
    """build_chat_prompt against the obvious algorithm (drop the oldest turn until it fits) on random
    histories and budgets."""
    tok, template = chat.tokenizer, load_template(template_name, chat.tokenizer)
    rng = random.Random(0)
    words = ["a", "hello", "世界", "QLoRA", "\n", "### Response:", "{input}", " "]
    for _ in range(12):
        history = [
            ("".join(rng.choices(words, k=rng.randint(0, 12))), "".join(rng.choices(words, k=rng.randint(0, 12))))
            for _ in range(rng.randint(0, 12))
        ]
        full = len(encode_conversation(tok, template, history_to_messages(history, "q"), add_generation_prompt=True)[0])
        budget = rng.randint(full // 4, full + 5)
        expected = list(history)
        while True:
            ids = encode_conversation(tok, template, history_to_messages(expected, "q"), add_generation_prompt=True)[0]
            if len(ids) <= budget or not expected:
                break
            expected.pop(0)
        if len(ids) > budget:
            with pytest.raises(PromptTooLong):
                build_chat_prompt(tok, template, history, "q", budget)
        else:
            assert build_chat_prompt(tok, template, history, "q", budget) == (ids, len(expected))


def run_cli(monkeypatch, capsys, chat_args, lines):
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    history = cli_demo.main(cli_demo.parse_args(chat_args))
    out, err = capsys.readouterr()
    return history, out, err


def test_cli_refuses_a_long_message_and_survives_out_of_memory(
    tiny_llama_dir, tiny_llama_reply, monkeypatch, capsys, inject_out_of_memory
):
    import utils.chat

    load = utils.chat.load_chat_model

    def load_with_injection(args, log=print):
        chat = load(args, log)
        inject_out_of_memory(chat.model, chat.tokenizer, "run out of memory")
        return chat

    monkeypatch.setattr(utils.chat, "load_chat_model", load_with_injection)
    argv = [
        "--model_path",
        tiny_llama_dir,
        "--num_gpus",
        "0",
        "--temperature",
        "0",
        "--max_new_tokens",
        "6",
        "--max_input_tokens",
        "8",
    ]
    history, out, err = run_cli(monkeypatch, capsys, argv, ["hello " * 9, "please run out of memory", "hi"])
    assert "(error: the message is 9 tokens long; the limit is 8)" in err
    assert "(error: out of memory while generating this reply; try a shorter message" in err
    assert "Traceback" not in err
    assert [q for q, _ in history] == ["hi"] and tiny_llama_reply.startswith(history[0][1])

"""Fixtures shared by the test files: tiny LLaMA models that load and generate in seconds on a CPU, one with the
bundled SmolLM2 tokenizer (byte-level BPE, a chat template) and one with a LLaMA-1/2-style SentencePiece
tokenizer trained here on the sample data."""

import json
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_FILES = [str(ROOT / "dataset" / name)
                for name in ("sample.json", "sample_sharegpt.json", "sample_messages.jsonl")]

# Greedy decoding of the tiny model answers a chat-template prompt with this text repeated until
# max_new_tokens, and never emits EOS. Each Chinese character spans several byte-level tokens, so a
# streamed prefix of the reply that ends mid-character would show U+FFFD.
TINY_REPLY_CYCLE = "你好, hello! 世界。"


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives a page in a real headless Chromium (/usr/bin/chromium)")


def _plant_cycle(model, start_id, cycle_ids, scale=30.0):
    """Make greedy decoding go start -> cycle[0] -> cycle[1] -> ... -> cycle[0] -> ...

    Each token involved gets an embedding `scale` times the random init along its own orthonormal
    direction, so it dominates the (still random, trainable) layers' contribution to the last hidden
    state, and the lm_head row of its successor points along that direction.
    """
    emb, head = model.get_input_embeddings().weight, model.lm_head.weight
    ids = [start_id] + cycle_ids
    dirs, _ = torch.linalg.qr(torch.randn(emb.shape[1], len(ids)))  # (hidden, len(ids)), orthonormal columns
    with torch.no_grad():
        for i, (prev, nxt) in enumerate(zip(ids, cycle_ids + [cycle_ids[0]])):
            emb[prev] = dirs[:, i] * scale * emb.shape[1] ** 0.5 * 0.02
            head[nxt] += dirs[:, i]


@pytest.fixture
def free_port():
    """free_port() -> a TCP port no process listens on now, for a launcher's rendezvous: a fixed port may still
    be held by another run on the machine."""
    import socket

    def pick():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return pick


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random 2-layer LLaMA (hidden 64) with the bundled SmolLM2 tokenizer and chat template, saved as an
    HF folder (fp32 safetensors). Its greedy reply to a chat-template prompt (which ends in the generation
    prompt's last token, where the planted cycle starts) is TINY_REPLY_CYCLE repeated, checked here."""
    from utils.modeling import load_tokenizer, resolve_model_path
    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m"))  # converts the bundled GGUF once (~20 s)
    with torch.random.fork_rng():  # seeded, without touching the RNG of the tests that run after
        torch.manual_seed(0)
        model = _planted_model(tokenizer)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _planted_model(tokenizer, prompt_ids=None, reply_cycle=TINY_REPLY_CYCLE):
    """A random tiny LLaMA whose greedy reply to `prompt_ids` (default: "hi" in the tokenizer's chat template)
    is `reply_cycle` repeated."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    if prompt_ids is None:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                               tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    cycle_ids = tokenizer(reply_cycle, add_special_tokens=False)["input_ids"]
    if tokenizer.convert_ids_to_tokens(cycle_ids[0]) == "\u2581":  # SentencePiece's lone word-start piece
        cycle_ids = cycle_ids[1:]
    assert len(set(cycle_ids + prompt_ids[-1:])) == len(cycle_ids) + 1, "the cycle's tokens must be distinct"
    _plant_cycle(model, prompt_ids[-1], cycle_ids)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0  # EOS logit 0: never the greedy choice

    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=3 * len(cycle_ids), do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    reply = tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)
    assert reply == reply_cycle * 3, f"the planted reply did not come out: {reply!r}"
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.fixture(scope="session")
def tiny_llama_reply():
    """What the tiny model's greedy reply repeats (see tiny_llama_dir)."""
    return TINY_REPLY_CYCLE


# ---------------------------------------------------------------------------------------------------------
# The LLaMA-1/2 tokenizer path: SentencePiece tokenizer.model, BOS added, no pad token, "\u2581" spacing
# ---------------------------------------------------------------------------------------------------------

# What the SentencePiece tiny model answers under the llama2 template: "羊驼" is not in the sample data, so
# each of its characters is three byte-fallback tokens; a streamed prefix cut inside one would show U+FFFD.
TINY_SP_REPLY_CYCLE = "你好，羊驼！"


def sample_texts():
    """Every line of text in the sample data files (Chinese and English)."""
    from utils.data import load_dataset
    conversations, _ = load_dataset(SAMPLE_FILES, log=lambda msg: None)
    return [line for messages in conversations for m in messages for text in (m["content"], m.get("input") or "")
            for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def llama_sp_dir(tmp_path_factory):
    """A folder with a LLaMA-style SentencePiece tokenizer.model trained on the sample data, as LLaMA's was
    trained (BPE, byte fallback, no normalisation, whitespace kept, digits split; <unk>=0, <s>=1, </s>=2, no
    pad). 1000 pieces: common Chinese characters are pieces, rare ones fall back to their UTF-8 bytes."""
    import sentencepiece as spm
    folder = tmp_path_factory.mktemp("llama_sp")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(sample_texts()) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=1000, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, character_coverage=0.995, num_threads=1,
        minloglevel=2)
    for name in ("tokenizer.vocab", "corpus.txt"):
        (folder / name).unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}))
    return folder


@pytest.fixture(scope="session")
def tiny_llama_sp_dir(llama_sp_dir, tmp_path_factory):
    """A random 2-layer LLaMA (hidden 64) with the SentencePiece tokenizer, saved as an HF folder. Its greedy
    reply to a question in the llama2 template is TINY_SP_REPLY_CYCLE repeated (checked here)."""
    from utils.modeling import load_tokenizer
    from utils.prompts import encode_conversation, load_template
    tokenizer = load_tokenizer(str(llama_sp_dir))
    prompt_ids, _ = encode_conversation(tokenizer, load_template("llama2"), [{"role": "user", "content": "hi"}],
                                        add_generation_prompt=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _planted_model(tokenizer, prompt_ids, TINY_SP_REPLY_CYCLE)
    folder = tmp_path_factory.mktemp("tiny-llama-sp")
    model.save_pretrained(folder)
    for name in ("tokenizer.model", "tokenizer_config.json"):  # as a LLaMA-2 checkpoint ships its tokenizer
        shutil.copy(llama_sp_dir / name, folder / name)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama_sp_reply():
    return TINY_SP_REPLY_CYCLE


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The bundled SmolLM2 tokenizer (BPE, with a chat template), as the scripts load it."""
    from utils.modeling import load_tokenizer, resolve_model_path
    return load_tokenizer(resolve_model_path("smollm2-135m"))

@pytest.fixture
def inject_out_of_memory(monkeypatch):
    """inject(model, tokenizer, trigger): make the output layer raise torch.OutOfMemoryError in its third
    forward pass of a reply whose prompt contains `trigger` (as when a reply's KV cache outgrows the GPU), and
    work as before otherwise. The output layer runs on both decoding paths (the static-cache decoder and
    transformers' generate). Returns a list that gets one entry per error raised."""
    import utils.chat

    def inject(model, tokenizer, trigger, after_steps=2):
        raised, reply = [], {"armed": False, "steps": 0}
        real_stream = utils.chat.stream_reply

        def stream_reply(model_, tokenizer_, input_ids, *args, **kwargs):
            reply.update(armed=trigger in tokenizer.decode(input_ids), steps=0)
            yield from real_stream(model_, tokenizer_, input_ids, *args, **kwargs)

        def explode(*_):
            if reply["armed"]:
                reply["steps"] += 1
                if reply["steps"] > after_steps:
                    reply["armed"] = False
                    raised.append(1)
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")

        monkeypatch.setattr(utils.chat, "stream_reply", stream_reply)
        model.get_output_embeddings().register_forward_hook(explode)
        return raised

    return inject

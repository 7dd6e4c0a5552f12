"""utils/decoder.py (the static-cache decoder behind stream_reply) on the CPU, where it computes exactly what
transformers' generate computes: the same tokens greedy, with a repetition penalty, with grouped-query attention,
and on a later turn that reuses the cached conversation."""

import threading

import pytest
import torch

from utils.decoder import fast_decoder, unsupported_reason
from utils.generation import generate_reply, stream_reply


def _model(kv_heads):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[2] = 0  # EOS logit 0: replies run to max_new_tokens
    return model


def _generate(model, ids, n, **kwargs):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, pad_token_id=0, eos_token_id=2, **kwargs)
    return out[0, len(ids):].tolist()


def _decode(engine, ids, n, **gen):
    gen = {"max_new_tokens": n, "eos_token_id": [2], "do_sample": False, "repetition_penalty": 1.0, **gen}
    assert engine.try_acquire()
    try:
        return list(engine.generate(ids, gen, threading.Event()))
    finally:
        engine.release()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_greedy_tokens_equal_generate_across_turns(kv_heads):
    model = _model(kv_heads)
    engine = fast_decoder(model)
    assert engine is not None and not engine.use_graphs  # CPU: eager, exact-length attention
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 500, (37,), generator=g).tolist()
    reply = _decode(engine, prompt, 40)
    assert reply == _generate(model, prompt, 40, do_sample=False)
    assert engine.last_stats["reused_tokens"] == 0 and engine.last_stats["new_tokens"] == 40

    turn2 = prompt + reply + torch.randint(3, 500, (11,), generator=g).tolist()
    assert _decode(engine, turn2, 25) == _generate(model, turn2, 25, do_sample=False)
    assert engine.last_stats["reused_tokens"] == len(prompt) + 39  # the last reply token was never fed back
    assert _decode(engine, turn2, 25, repetition_penalty=1.5) == \
        _generate(model, turn2, 25, do_sample=False, repetition_penalty=1.5)


def test_sampling_settings_are_applied():
    model = _model(4)
    engine = fast_decoder(model)
    prompt = list(range(3, 40))
    greedy = _decode(engine, prompt, 20)
    assert _decode(engine, prompt, 20, do_sample=True, top_k=1, temperature=0.7, top_p=0.9) == greedy
    torch.manual_seed(0)
    a = _decode(engine, prompt, 20, do_sample=True, temperature=1.5, top_p=1.0)
    torch.manual_seed(0)
    assert _decode(engine, prompt, 20, do_sample=True, temperature=1.5, top_p=1.0) == a  # seeded
    assert a != greedy


def test_stream_reply_goes_through_the_decoder_and_stops(tiny_llama_dir, tiny_llama_reply, monkeypatch):
    from utils.modeling import load_model
    from utils.prompts import encode_conversation, load_template
    model, tok, _ = load_model(tiny_llama_dir, num_gpus=0)
    ids, _ = encode_conversation(tok, load_template("auto", tok), [{"role": "user", "content": "hi"}],
                                 add_generation_prompt=True)
    n = 3 * len(tok(tiny_llama_reply, add_special_tokens=False)["input_ids"])
    settings = {"max_new_tokens": n, "temperature": 0}
    assert generate_reply(model, tok, ids, settings) == tiny_llama_reply * 3
    assert model._static_decoder.last_stats["new_tokens"] == n

    stop = threading.Event()
    stream = stream_reply(model, tok, ids, settings, stop)
    first = next(stream)
    stop.set()
    rest = "".join(stream)
    assert len(first + rest) < len(tiny_llama_reply * 3) and "\ufffd" not in first + rest

    monkeypatch.setenv("LLAMA_QLORA_FAST_DECODE", "0")  # the transformers path gives the same reply
    calls = model._static_decoder.last_stats
    assert generate_reply(model, tok, ids, settings) == tiny_llama_reply * 3
    assert model._static_decoder.last_stats is calls


def test_busy_decoder_leaves_the_reply_to_generate(tiny_llama_dir, tiny_llama_reply):
    from utils.modeling import load_model
    from utils.prompts import encode_conversation, load_template
    model, tok, _ = load_model(tiny_llama_dir, num_gpus=0)
    ids, _ = encode_conversation(tok, load_template("auto", tok), [{"role": "user", "content": "hi"}],
                                 add_generation_prompt=True)
    engine = fast_decoder(model)
    assert engine.try_acquire()  # another reply holds it: this one goes through generate()
    try:
        reply = generate_reply(model, tok, ids, {"max_new_tokens": 8, "temperature": 0})
    finally:
        engine.release()
    assert reply and tiny_llama_reply.startswith(reply) and engine.last_stats == {}


def test_models_it_does_not_cover_say_why():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64))
    assert unsupported_reason(gpt2) == "model type 'gpt2'"
    assert fast_decoder(gpt2) is None
    model = _model(4)
    model.generation_config.no_repeat_ngram_size = 3
    assert unsupported_reason(model) == "generation_config.no_repeat_ngram_size is set"


def _with_adapter(targets="all-linear", **kwargs):
    from peft import LoraConfig, get_peft_model
    model = _model(2)
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False,
                        **kwargs)
    return get_peft_model(model, config).eval()


def _worst_deficit(model, ids, reply):
    """How far below the full forward pass's best logit each chosen token's logit is (0 for greedy agreement)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + reply])).logits[0, len(ids) - 1:-1]
    return (logits.max(-1).values - logits.gather(1, torch.tensor(reply)[:, None])[:, 0]).max().item()


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "down_proj"]])
def test_lora_adapter_runs_as_stacked_matrices_with_peft_result(targets):
    """A peft adapter (random B, so it matters) becomes one A and one block-diagonal B per group; the decoder's
    greedy replies are the full model's argmax, also where only some projections of a group have an adapter."""
    model = _with_adapter(targets)
    engine = fast_decoder(model)
    qkv, down, gate_up = engine.proj[0, "qkv"], engine.proj[0, "down"], engine.proj[0, "gate_up"]
    assert not qkv.as_modules and qkv.A is not None and qkv.B.shape == (64 + 32 + 32, qkv.A.shape[0])
    if targets != "all-linear":
        assert qkv.adapted == [True, False, True] and qkv.A.shape[0] == 8 and gate_up.A is None
        assert not qkv.B[64:96].any()  # k_proj's rows: no adapter
    assert down.A is not None
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 500, (29,), generator=g).tolist()
    reply = _decode(engine, prompt, 30)
    assert _worst_deficit(model, prompt, reply) < 1e-5
    assert reply == _generate(model, prompt, 30, do_sample=False)
    with model.disable_adapter():  # without the adapter the reply differs: the test above saw the adapter
        assert _generate(model, prompt, 30, do_sample=False) != reply


def test_adapter_changes_between_replies_are_noticed():
    """Trained further in place, disabled, swapped for another or merged: the next reply uses the adapter as it
    is now, and the conversation cached under the old one is not reused."""
    model = _with_adapter()
    engine = fast_decoder(model)
    prompt = list(range(3, 40))
    first = _decode(engine, prompt, 12)
    turn2 = prompt + first + [7, 8, 9]
    lora_b = model.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight
    down = engine.proj[1, "down"]
    stacked_b = down.B
    engine.graphs = {256: "a captured graph"}  # stands in for the GPU's graphs (the CPU captures none)
    with torch.no_grad():
        lora_b.mul_(-3.0)  # an optimizer step changes the weights in place
    reply = _decode(engine, turn2, 12)
    assert engine.last_stats["reused_tokens"] == 0
    assert reply == _generate(model, turn2, 12, do_sample=False)
    assert _worst_deficit(model, turn2, reply) < 1e-5
    # remade in place: graphs captured with the old copies read the new values, so they are kept
    assert engine.proj[1, "down"] is down and down.B is stacked_b and engine.graphs == {256: "a captured graph"}
    with model.disable_adapter():
        plain = _decode(engine, turn2, 12)
        assert plain == _generate(model, turn2, 12, do_sample=False) != reply
        assert down.A is None and engine.graphs == {}  # the copies went away: graphs must be captured again
    again = _decode(engine, turn2, 12)  # enabled again
    assert again == reply
    from peft import LoraConfig
    torch.manual_seed(5)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.set_adapter("other")  # another adapter, of another rank
    other = _decode(engine, turn2, 12)
    assert other == _generate(model, turn2, 12, do_sample=False) != reply
    assert engine.proj[1, "down"].A.shape[0] == 2
    model.set_adapter("default")
    model.merge_adapter()
    assert _decode(engine, turn2, 12) == _generate(model, turn2, 12, do_sample=False)


def test_adapter_the_stacked_path_does_not_cover_runs_as_peft_modules():
    model = _with_adapter(use_dora=True)
    engine = fast_decoder(model)
    assert all(p.as_modules for p in engine.proj.values())
    prompt = list(range(5, 30))
    assert _decode(engine, prompt, 15) == _generate(model, prompt, 15, do_sample=False)

"""utils/speed.py on the CPU: each speed-up computes what the plain recipe computes.

Packed micro-batches give the loss and gradients of the padded batch (so no example sees another); the fused
LoRA layers give peft's outputs and gradients on 16-bit and NF4 bases; the chunked loss equals transformers'
loss; fused RMSNorm / SwiGLU replace modules without changing outputs or adapter names.
"""

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict

from utils import speed
from utils.data import pad_collate

EXAMPLES = [(20, 8), (33, 5), (9, 4), (16, 15)]  # (tokens, prompt tokens)


class _Pad:
    pad_token_id = 0


def _examples(vocab=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, prompt in EXAMPLES:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * prompt + ids[prompt:]})
    return out


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    folder = tmp_path_factory.mktemp("speed-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def _load(folder, bits, fused, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    from utils.modeling import quantization_config
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map={"": "cpu"},
                                                 quantization_config=quantization_config(bits),
                                                 attn_implementation=attn)
    speed.prepare_model(model)
    torch.manual_seed(0)  # the same adapter init (non-zero B: the test must not pass for nothing) either way
    config = speed.lora_config(bits, fused=fused, r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                               task_type="CAUSAL_LM", init_lora_weights=False)
    return get_peft_model(model, config).train()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _close(a, b, tol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=tol, atol=tol * a[k].abs().max()), k


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_loss_and_grads_equal_padded_batch(tiny_folder, attn):
    model = _load(tiny_folder, 16, fused=False, attn=attn)
    padded = pad_collate(_Pad())(_examples())
    loss = model(**padded).loss
    loss.backward()
    ref = _grads(model)
    model.zero_grad()
    packed = speed.packed_collate()(_examples())
    assert packed["input_ids"].shape == (1, sum(n for n, _ in EXAMPLES)) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [i for n, _ in EXAMPLES for i in range(n)]
    packed_loss = model(**packed).loss
    packed_loss.backward()
    assert abs(packed_loss.item() - loss.item()) < 1e-5
    _close(_grads(model), ref, 1e-4)


def test_packed_logits_equal_each_example_alone(tiny_folder):
    model = _load(tiny_folder, 16, fused=False).eval()
    examples = _examples()
    with torch.no_grad():
        packed = speed.packed_collate()(examples)
        packed.pop("labels")
        logits = model(**packed).logits[0]
        start = 0
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            assert torch.allclose(logits[start:start + len(alone)], alone, atol=1e-5)
            start += len(alone)


def test_packed_rows_fill_with_a_segment_of_their_own():
    examples = _examples()
    batch = speed.packed_collate(row_tokens=40, logits_to_keep=1)(examples)
    # rows: [20] (20 + 33 > 40), [33], [9, 16]; width 33; fillers restart their positions and have no labels
    assert batch["input_ids"].shape == (3, 33) and batch["logits_to_keep"] == 1 and batch["use_cache"] is False
    assert batch["position_ids"][0].tolist() == list(range(20)) + list(range(13))
    assert batch["position_ids"][2].tolist() == list(range(9)) + list(range(16)) + list(range(8))
    assert batch["labels"][0, 20:].eq(-100).all() and batch["labels"][2, 25:].eq(-100).all()
    assert (batch["labels"][:, 1:] != -100).sum() == sum(n - p for n, p in EXAMPLES)
    # where each segment (example or filler) starts among all 3 x 33 tokens, for attention by segment on a GPU
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["max_length_q"] == batch["max_length_k"] == 33
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 20, 33, 66, 75, 91, 99]
    one_row = speed.packed_collate()(examples)
    assert one_row["cu_seq_lens_q"].tolist() == [0, 20, 53, 62, 78] and one_row["max_length_q"] == 33
    equal = speed.packed_collate(row_tokens=8)([{"input_ids": [5] * 8, "labels": [5] * 8}] * 2)
    assert "position_ids" not in equal  # no reset: plain causal attention, the positions transformers makes
    assert "cu_seq_lens_q" not in equal


@pytest.mark.parametrize("bits", [16, 4])
def test_fused_lora_layers_match_peft(tiny_folder, bits):
    if bits == 4:
        pytest.importorskip("bitsandbytes")
    batch = pad_collate(_Pad())(_examples())
    losses, grads = {}, {}
    for fused in (False, True):
        model = _load(tiny_folder, bits, fused)
        n_fused = sum(isinstance(m, speed._FusedLoraMixin) for m in model.modules())
        assert n_fused == (14 if fused else 0)
        loss = model(**batch).loss
        loss.backward()
        losses[fused], grads[fused] = loss.item(), _grads(model)
        names = sorted(get_peft_model_state_dict(model))
    assert abs(losses[True] - losses[False]) < 1e-5
    _close(grads[True], grads[False], 1e-4)
    assert names == sorted(get_peft_model_state_dict(_load(tiny_folder, bits, False)))  # same adapter files


def test_fused_lora_falls_back_to_peft_with_dropout(tiny_folder):
    model = _load(tiny_folder, 16, fused=True)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer._fused_adapter((), {}) == "default"
    layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
    assert layer._fused_adapter((), {}) is None
    layer.eval()
    assert layer._fused_adapter((), {}) == "default"  # dropout is a no-op in eval mode


def test_chunked_loss_equals_transformers_loss(tiny_folder):
    model = _load(tiny_folder, 16, fused=False)
    batch = pad_collate(_Pad())(_examples())
    ref = model(**batch).loss
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad()
    loss_func = speed.FusedCausalLMLoss(model, chunk_tokens=7)  # several chunks
    labels = batch.pop("labels")
    outputs = model(**batch, logits_to_keep=1)
    assert outputs.logits.shape[1] == 1
    loss = loss_func(outputs, labels)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    _close(_grads(model), ref_grads, 1e-4)
    items = (labels[:, 1:] != -100).sum()
    model(**batch, logits_to_keep=1)
    halved = loss_func(None, labels, items * 2)  # num_items_in_batch (gradient accumulation): sum / that count
    assert abs(halved.item() - ref.item() / 2) < 1e-5


def test_loss_in_the_output_layer_equals_the_loss_after_the_model(tiny_folder):
    """FusedCausalLMLoss(in_output_layer=True), as under FSDP with the output layer a unit of its own: the loss
    is computed while the output layer runs, from the labels given before the forward pass, and needs the
    layer's weight no more after that (FSDP frees it: here it is zeroed)."""
    model = _load(tiny_folder, 16, fused=False)
    batch = pad_collate(_Pad())(_examples())
    labels = batch.pop("labels")
    after = speed.FusedCausalLMLoss(model, chunk_tokens=7)
    ref = after(model(**batch, logits_to_keep=1), labels)
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad()
    after.remove()
    assert speed.ends_as_fsdp_units(model)
    inside = speed.FusedCausalLMLoss(model, chunk_tokens=7, in_output_layer=True)
    inside.expect(labels, None)
    outputs = model(**batch, logits_to_keep=1)
    with torch.no_grad():
        speed.causal_lm(model).get_output_embeddings().weight.zero_()
    loss = inside(outputs, labels)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    _close(_grads(model), ref_grads, 1e-4)
    model(**batch, logits_to_keep=1)  # no labels announced: no loss, and a clear error rather than a stale one
    with pytest.raises(RuntimeError, match="expect"):
        inside(outputs, labels)


def test_input_and_output_layers_become_fsdp_units_of_their_own_unless_tied(tiny_folder, monkeypatch):
    from peft.utils.other import fsdp_auto_wrap_policy
    from transformers import LlamaConfig, LlamaForCausalLM
    model = _load(tiny_folder, 16, fused=False)
    assert speed.ends_as_fsdp_units(model)
    lm = speed.causal_lm(model)
    assert type(lm.get_input_embeddings()) is speed.InputEmbedding
    assert type(lm.get_output_embeddings()) is speed.OutputLayer
    assert speed.fsdp_wrap_classes(model, {}) == ["LlamaDecoderLayer", "InputEmbedding", "OutputLayer"]
    given = {"FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer,LlamaMLP"}  # a user's choice is kept
    assert speed.fsdp_wrap_classes(model, given) == ["LlamaDecoderLayer", "LlamaMLP", "InputEmbedding", "OutputLayer"]
    # peft's wrap policy (what the Trainer hands to accelerate) reads the names and wraps those modules
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", ",".join(speed.fsdp_wrap_classes(model, {})))
    policy = fsdp_auto_wrap_policy(model)
    wrapped = {name.removeprefix("base_model.model.") for name, m in model.named_modules()
               if policy(module=m, recurse=False, nonwrapped_numel=0) and "lora_" not in name}
    assert wrapped == {"model.embed_tokens", "lm_head", "model.layers.0", "model.layers.1"}

    tied = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    assert not speed.ends_as_fsdp_units(tied)  # one weight: it must stay in one unit
    assert type(tied.get_input_embeddings()) is torch.nn.Embedding and type(tied.lm_head) is torch.nn.Linear


def test_linear_cross_entropy_masks_ignored_rows_without_selecting_them():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    labels[0, :5] = -100
    labels[1, 7:] = -100
    for items, chunk in ((None, 5), (torch.tensor(30), 4), (30, 100)):
        hidden.grad = None
        loss = speed.linear_cross_entropy(hidden, weight, labels, items, chunk_tokens=chunk)
        loss.backward()
        mine = hidden.grad.clone()
        hidden.grad = None
        logits = hidden[:, :-1] @ weight.t()
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum")
        ref = ref / (int((labels[:, 1:] != -100).sum()) if items is None else int(items))
        ref.backward()
        assert abs(loss.item() - ref.item()) < 1e-5, (items, chunk)
        torch.testing.assert_close(mine, hidden.grad, atol=1e-6, rtol=1e-5)
    # an ignored row holding NaN (a fully masked padded position) changes nothing
    with torch.no_grad():
        poisoned = hidden.detach().clone()
        poisoned[0, 2] = float("nan")
    poisoned.requires_grad_(True)
    loss = speed.linear_cross_entropy(poisoned, weight, labels, None, chunk_tokens=5)
    loss.backward()
    clean = hidden.detach().clone().requires_grad_(True)
    ref = speed.linear_cross_entropy(clean, weight, labels, None, chunk_tokens=5)
    ref.backward()
    assert loss.item() == ref.item()
    torch.testing.assert_close(poisoned.grad[:, 3:], clean.grad[:, 3:])
    assert poisoned.grad[0, 2].abs().max().item() == 0.0
    hidden.grad = None
    nothing = speed.linear_cross_entropy(hidden, weight, torch.full_like(labels, -100), torch.tensor(0))
    nothing.backward()
    assert nothing.item() == 0.0 and hidden.grad.abs().max().item() == 0.0


def test_fused_norm_and_mlp_modules_keep_outputs_and_names(tiny_folder):
    model = _load(tiny_folder, 16, fused=True)
    batch = pad_collate(_Pad())(_examples())
    with torch.no_grad():
        before = model(**batch).logits
    names = sorted(get_peft_model_state_dict(model))
    norms, mlps = speed.fuse_modules(model)
    assert (norms, mlps) == (5, 2)
    assert isinstance(model.base_model.model.model.norm, speed.FusedRMSNorm)
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert sorted(get_peft_model_state_dict(model)) == names


def test_training_speedups_describe_what_is_on(tiny_folder):
    model = _load(tiny_folder, 16, fused=True)
    sp = speed.TrainingSpeedups(model)
    text = sp.describe()
    assert "fused LoRA forward in 14 layers" in text and "RMSNorm x5" in text and "chunked cross entropy" in text
    batch = sp.collator(_Pad())(_examples())
    assert batch["input_ids"].shape[0] == 1 and batch["logits_to_keep"] == 1

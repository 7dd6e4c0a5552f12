"""utils/fused_layer.py on the CPU: the whole-layer function computes what the plain peft model computes.

Each test trains one step (loss and every adapter gradient) with the original decoder layers and with
FastDecoderLayer, on 16-bit and NF4 bases (double quantization included), with grouped-query attention, packed
rows (block-diagonal mask) and padded batches, with and without gradient checkpointing.
"""

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model, get_peft_model_state_dict
from test_speed import _examples, _Pad  # the same four examples (tokens, prompt tokens)

from utils import fused_layer, speed
from utils.data import pad_collate


@pytest.fixture(scope="module")
def gqa_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    folder = tmp_path_factory.mktemp("fused-layer-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def _load(folder, bits, targets="all-linear", attn="sdpa", double_quant=True):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    quant = None
    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                   bnb_4bit_use_double_quant=double_quant)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map={"": "cpu"},
                                                 quantization_config=quant, attn_implementation=attn)
    speed.prepare_model(model)
    torch.manual_seed(0)  # the same non-zero adapter either way: a test that compares zeros cannot fail
    config = speed.lora_config(bits, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                               task_type="CAUSAL_LM", init_lora_weights=False)
    return get_peft_model(model, config).train()


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(ref, got, tol=1e-4):
    (l0, g0), (l1, g1) = ref, got
    assert abs(l0 - l1) < tol * max(1.0, abs(l0))
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        assert g0[k].abs().max() > 0, k
        assert torch.allclose(g0[k], g1[k], rtol=tol, atol=tol * g0[k].abs().max()), k


@pytest.mark.parametrize("bits,targets,double_quant", [(16, "all-linear", True), (4, "all-linear", True),
                                                        (4, "q_proj,v_proj", False)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_layers_train_like_peft(gqa_folder, bits, targets, double_quant, checkpointing):
    if bits == 4:
        pytest.importorskip("bitsandbytes")
    targets = targets if targets == "all-linear" else targets.split(",")
    batches = {"padded": dict(pad_collate(_Pad())(_examples()), use_cache=False),  # no KV cache in training
               "packed": speed.packed_collate()(_examples())}
    model = _load(gqa_folder, bits, targets, double_quant=double_quant)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = {name: _step(model, b) for name, b in batches.items()}
    names = sorted(get_peft_model_state_dict(model))
    assert fused_layer.fuse_decoder_layers(model) == 2
    layers = model.base_model.model.model.layers
    assert all(isinstance(layer, fused_layer.FastDecoderLayer) for layer in layers)
    assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
    calls = []
    runs = (fused_layer.run_layer, fused_layer.run_layer_and_middle, fused_layer.run_layer_gradients)
    real = [run.fn for run in runs]
    for run, fn in zip(runs, real):
        run.fn = lambda *a, fn=fn: calls.append(fn.__name__) or fn(*a)
    try:
        got = {name: _step(model, b) for name, b in batches.items()}
    finally:
        for run, fn in zip(runs, real):
            run.fn = fn
    # the fused path ran (with checkpointing: a forward without gradients, then the recomputation)
    expected = ["decoder_layer_and_middle", "decoder_layer_gradients"] if checkpointing else ["decoder_layer"]
    assert sorted(calls) == sorted(expected * 2 * len(batches))
    for name in batches:
        _assert_same(ref[name], got[name])
    assert sorted(get_peft_model_state_dict(model)) == names  # same adapter files


def test_layers_fall_back_where_the_fused_function_does_not_apply(gqa_folder):
    model = _load(gqa_folder, 16)
    assert fused_layer.fuse_decoder_layers(model) == 2
    layer = model.base_model.model.model.layers[0]
    q = layer.self_attn.q_proj
    assert fused_layer.projection_args(q) is not None
    q.lora_dropout["default"] = torch.nn.Dropout(0.1)  # peft's dropout: only its own forward applies it
    assert fused_layer.projection_args(q) is None
    q.lora_dropout["default"] = torch.nn.Identity()
    h = torch.zeros(1, 3, 128)
    cos_sin = (torch.ones(1, 3, 32), torch.zeros(1, 3, 32))
    assert layer.fused_args(h, None, cos_sin, {}) is not None
    assert layer.fused_args(h, None, cos_sin, {"past_key_values": object()}) is None  # generation with a cache
    assert layer.fused_args(h, None, None, {}) is None
    with model.disable_adapter():
        assert layer.fused_args(h, None, cos_sin, {}) is None


def test_generation_through_fused_layers_equals_the_original(gqa_folder):
    model = _load(gqa_folder, 4).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        before = model.generate(input_ids=ids, **kwargs)
        model.train()
        fused_layer.fuse_decoder_layers(model)
        model.eval()
        after = model.generate(input_ids=ids, **kwargs)
    assert torch.equal(before, after)


def test_parked_inputs_come_back_on_their_device():
    h = torch.randn(2, 3)
    assert fused_layer.offload.fetch(fused_layer.offload.park(h), h.device) is h  # the CPU keeps its own


def test_layers_are_checked_before_they_are_replaced(gqa_folder):
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    model = speed.prepare_model(AutoModelForCausalLM.from_pretrained(gqa_folder, dtype=torch.bfloat16))
    assert fused_layer.fuse_decoder_layers(model) == 2  # bf16 rounding passes the check

    class Scaled(LlamaDecoderLayer):  # a LLaMA-shaped layer that computes something else
        def forward(self, hidden_states, **kwargs):
            return super().forward(hidden_states, **kwargs) * 1.05

    model = speed.prepare_model(AutoModelForCausalLM.from_pretrained(gqa_folder, dtype=torch.bfloat16))
    model.model.layers[1].__class__ = Scaled
    assert fused_layer.fuse_decoder_layers(model) == 1
    assert isinstance(model.model.layers[0], fused_layer.FastDecoderLayer) and type(model.model.layers[1]) is Scaled


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_dequantization_is_bitsandbytes_bit_for_bit(quant_type, nested, dtype):
    bnb = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(0)
    for shape in [(64, 128), (128, 256), (33, 7), (300, 1100)]:  # whole and partial blocks of 64 and of 256
        weight = (torch.randn(shape, generator=g) * 0.05).to(dtype)
        packed, state = bnb.quantize_4bit(weight, quant_type=quant_type, compress_statistics=nested, blocksize=64)
        nested_args = (state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize) \
            if nested else ()
        ours = fused_layer.dequantize_nf4(packed, state.absmax, state.code, state.blocksize, list(state.shape),
                                          state.dtype, *nested_args)
        assert torch.equal(ours, bnb.dequantize_4bit(packed, state)), shape


def _layer_inputs(layer, keep=False):
    """A random input for a FastDecoderLayer of the gqa model, its fused arguments (`keep`: 4-bit weights kept
    dequantized for the backward pass), and what gradients flow to."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn((2, 6, 128), generator=g) * 1e-2).requires_grad_()
    angles = torch.arange(6.0)[:, None] * torch.linspace(0, 1, 16)
    angles = torch.cat((angles, angles), dim=-1)[None]
    args = layer.fused_args(h, None, (angles.cos(), angles.sin()), {}, keep=keep)
    return h, args, [h] + [t for p in args[6:] for t in p[:2] if t is not None]


def _saved_by_compiled_layer(layer, functorch_config, keep=False):
    """Runs the layer's fused function compiled (AOTAutograd with Inductor's partitioner, eager kernels: the CPU
    has no Triton) and returns the floating-point tensors it saved for the backward pass, and its gradients."""
    torch._dynamo.reset()
    h, args, trainable = _layer_inputs(layer, keep)
    compiled = speed._Fused(fused_layer.decoder_layer, dynamic=None, functorch_config=functorch_config) \
        .compile(backend="aot_eager_decomp_partition")
    saved = []

    def keep(t):
        if t.is_floating_point():
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = compiled(h, *args)
    return saved, torch.autograd.grad(out.square().sum(), trainable)


def test_compiled_layer_saves_no_dequantized_weight(gqa_folder):
    """The compiled layer recomputes each NF4 weight in the backward pass instead of keeping it dequantized (see
    run_layer), and with run_layer's settings it gives the eager function's gradients."""
    model = _load(gqa_folder, 4)
    fused_layer.fuse_decoder_layers(model)
    layer = model.base_model.model.model.layers[0]
    weights = {tuple(getattr(getattr(layer, p), n).weight.quant_state.shape) for p, n in fused_layer.PROJECTIONS}
    saved, grads = _saved_by_compiled_layer(layer, fused_layer.run_layer.functorch_config)
    assert saved and not [t.shape for t in saved if tuple(t.shape) in weights]
    # the check can fail: with AOTAutograd's common-subexpression elimination on, the weights are saved
    merged, _ = _saved_by_compiled_layer(layer, {"cse": True})
    assert len({tuple(t.shape) for t in merged} & weights) == len(weights)
    h, args, trainable = _layer_inputs(layer)
    eager = torch.autograd.grad(fused_layer.decoder_layer(h, *args).square().sum(), trainable)
    for a, b in zip(eager, grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max())


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj"])
def test_kept_weights_are_read_once_and_give_the_same_gradients(gqa_folder, monkeypatch, targets):
    """With keep, each NF4 weight is dequantized once, in the forward pass, and the backward pass reads the
    saved copy: eagerly (no dequantization in the backward pass) and compiled with run_layer's settings (each
    weight saved once). The gradients are those of the layer that dequantizes again. With adapters on every
    projection (_LoraProjections) and on q/v only (the others through _Projection)."""
    model = _load(gqa_folder, 4, targets if targets == "all-linear" else targets.split(","))
    fused_layer.fuse_decoder_layers(model)
    layer = model.base_model.model.model.layers[0]
    shapes = sorted(tuple(getattr(getattr(layer, p), n).weight.quant_state.shape) for p, n in fused_layer.PROJECTIONS)
    h, args, trainable = _layer_inputs(layer)
    again = torch.autograd.grad(fused_layer.decoder_layer(h, *args).square().sum(), trainable)

    read, real = [], fused_layer._weight
    monkeypatch.setattr(fused_layer, "_weight", lambda spec, *a: read.append(tuple(spec[1])) or real(spec, *a))
    h, args, trainable = _layer_inputs(layer, keep=True)
    out = fused_layer.decoder_layer(h, *args)
    assert sorted(read) == shapes
    read.clear()
    kept = torch.autograd.grad(out.square().sum(), trainable)
    assert read == []  # nothing dequantized in the backward pass
    monkeypatch.setattr(fused_layer, "_weight", real)
    for a, b in zip(again, kept):
        assert torch.equal(a, b)

    saved, grads = _saved_by_compiled_layer(layer, fused_layer.run_layer.functorch_config, keep=True)
    assert sorted(tuple(t.shape) for t in saved if tuple(t.shape) in set(shapes)) == shapes
    for a, b in zip(again, grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max())


def test_layers_that_fit_count_what_the_gpu_has_left():
    gib = 2**30
    # an 80 GiB card, 20 GiB reserved at the peak, 1 GiB held elsewhere: 0.9 x 80 - 1 - 20 = 51 GiB of room
    assert fused_layer.layers_that_fit(gib // 2, 32, 80 * gib, 62 * gib, 17 * gib, 20 * gib, 0.9) == 32
    assert fused_layer.layers_that_fit(2 * gib, 32, 80 * gib, 62 * gib, 17 * gib, 20 * gib, 0.9) == 25
    # a 24 GiB card already near its share: nothing, never a negative count
    assert fused_layer.layers_that_fit(gib // 2, 32, 24 * gib, 3 * gib, 20 * gib, 21.5 * gib, 0.9) == 0
    assert fused_layer.layers_that_fit(gib // 2, 32, 24 * gib, 0, 24 * gib, 24 * gib, 0.9) == 0
    assert fused_layer.layers_that_fit(0, 32, 80 * gib, 62 * gib, 17 * gib, 20 * gib, 0.9) == 0  # 16-bit bases


def _dequantizations_per_step(model, monkeypatch, batch):
    read, real = [], fused_layer._weight
    monkeypatch.setattr(fused_layer, "_weight", lambda spec, *a: read.append(spec[0]) or real(spec, *a))
    result = _step(model, batch)
    monkeypatch.setattr(fused_layer, "_weight", real)
    return read.count("nf4"), result


@pytest.mark.parametrize("checkpointing", [False, True])
def test_weight_keeping_modes(gqa_folder, monkeypatch, checkpointing):
    """TrainingSpeedups(keep_dequantized=...): 'on' keeps every layer's weights (7 dequantizations per layer and
    step instead of 14) with the same loss and gradients; 'off' keeps none; 'auto' keeps none in the first step
    and decides at the second (on the CPU: none); with checkpointing nothing is kept in any mode."""
    batch = dict(pad_collate(_Pad())(_examples()), use_cache=False)
    runs = {}
    for mode in ("off", "on", "auto"):
        model = _load(gqa_folder, 4)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        sp = speed.TrainingSpeedups(model, keep_dequantized=mode)
        assert sp.layers == 2 and sp.weight_keeping.mode == mode
        runs[mode] = [_dequantizations_per_step(model, monkeypatch, batch) for _ in range(2)]
        assert sp.weight_keeping.decided == (mode != "auto" or not checkpointing)  # auto: at the second step
        assert sp.weight_keeping.kept == (2 if mode == "on" else 0)
    off = 2 * (19 if checkpointing else 14)  # 2 layers; checkpointed: forward 7, recomputation 5, backward 7
    assert [n for n, _ in runs["off"]] == [off, off]
    assert [n for n, _ in runs["on"]] == ([off, off] if checkpointing else [2 * 7] * 2)
    assert [n for n, _ in runs["auto"]] == [off, off]
    for mode in ("on", "auto"):
        for ref, got in zip(runs["off"], runs[mode]):
            _assert_same(ref[1], got[1])


def test_weight_keeping_auto_decides_by_each_gpus_memory(gqa_folder):
    """'auto' keeps as many layers per device as layers_that_fit says, from the memory figures it is given."""
    model = _load(gqa_folder, 4)
    sp = speed.TrainingSpeedups(model, keep_dequantized="auto")
    keeping = sp.weight_keeping
    per_layer = fused_layer.kept_bytes(keeping.layers[0], torch.bfloat16)
    assert per_layer == 2 * sum(getattr(getattr(keeping.layers[0], p), n).weight.quant_state.shape.numel()
                                for p, n in fused_layer.PROJECTIONS)
    total = 100 * per_layer
    # 1 layer's worth held elsewhere, 88 reserved at the peak: 90 - 1 - 88 leaves room for one layer
    keeping.decide(torch.bfloat16, lambda device: (total, total - 88 * per_layer, 87 * per_layer,
                                                   88 * per_layer))
    assert [layer.keep_weights for layer in keeping.layers] == [True, False] and keeping.kept == 1
    with pytest.raises(ValueError, match="keep_dequantized"):
        fused_layer.WeightKeeping(keeping.layers, "always")


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj"])
def test_recomputation_skips_the_outputs_nobody_reads(gqa_folder, monkeypatch, targets):
    """A checkpointed layer's recomputation (decoder_layer_gradients, given the input and the middle residual)
    dequantizes and multiplies by only q/k/v/gate/up in its forward; o_proj's and down_proj's weights are read in
    the backward pass alone. Its gradients are decoder_layer's, eagerly and compiled (AOTAutograd with Inductor's
    partitioner), with adapters on all projections and on q/v only (o and down then have none)."""
    model = _load(gqa_folder, 4, targets if targets == "all-linear" else targets.split(","))
    fused_layer.fuse_decoder_layers(model)
    layer = model.base_model.model.model.layers[0]
    shape = {n: tuple(getattr(getattr(layer, p), n).weight.quant_state.shape) for p, n in fused_layer.PROJECTIONS}
    h, args, trainable = _layer_inputs(layer)
    with torch.no_grad():  # as a checkpointed layer's forward runs
        out, middle = fused_layer.decoder_layer_and_middle(h, *args)
    eager = torch.autograd.grad(fused_layer.decoder_layer(h, *args).square().sum(), trainable)
    grad_out = 2 * out  # the gradient of out.square().sum()

    read, real = [], fused_layer._weight
    monkeypatch.setattr(fused_layer, "_weight", lambda spec, *a: read.append(tuple(spec[1])) or real(spec, *a))
    recomputed = fused_layer.decoder_layer_gradients(h, middle, *args)
    assert torch.equal(recomputed, middle)  # its value is the given middle residual
    assert sorted(read) == sorted(shape[n] for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    read.clear()
    grads = torch.autograd.grad(recomputed, trainable, grad_out)
    assert sorted(read) == sorted(shape.values())  # every weight in the backward pass
    monkeypatch.setattr(fused_layer, "_weight", real)

    torch._dynamo.reset()
    compiled = speed._Fused(fused_layer.decoder_layer_gradients, dynamic=None,
                            functorch_config=fused_layer.run_layer_gradients.functorch_config) \
        .compile(backend="aot_eager_decomp_partition")
    compiled_grads = torch.autograd.grad(compiled(h, middle, *args), trainable, grad_out)
    for a, b, c in zip(eager, grads, compiled_grads):
        assert a.abs().max() > 0
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max())
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-4 * a.abs().max())


def test_nf4_kernel_self_check_falls_back_to_torch_ops(monkeypatch, capsys):
    """utils/nf4_kernel.py checks once that the Triton kernel runs and agrees with the torch ops; a kernel that
    raises or computes something else is not used (with a note), and the answer is kept. On the CPU the kernel
    is stood in for by Python functions."""
    from utils import nf4_kernel

    def good(packed, absmax, code, absmax2, code2, offset, nested, blocksize, blocksize2, n, dtype):
        args = (absmax2, code2, offset, blocksize2) if nested else ()
        return fused_layer.dequantize_nf4(packed, absmax, code, blocksize, [n], dtype, *args)

    def broken(*args):
        raise RuntimeError("PTX .version 9.9 does not support .target sm_61\nmore detail")

    def wrong(*args):
        return good(*args) + 1

    monkeypatch.setattr(nf4_kernel, "_dequantize", good, raising=False)
    assert nf4_kernel.self_check("cpu") and capsys.readouterr().err == ""
    monkeypatch.setattr(nf4_kernel, "_dequantize", broken, raising=False)
    assert not nf4_kernel.self_check("cpu")
    assert capsys.readouterr().err == ("note: the Triton NF4 kernel is not used here (RuntimeError: PTX .version "
                                       "9.9 does not support .target sm_61); dequantizing with torch ops\n")
    monkeypatch.setattr(nf4_kernel, "_dequantize", wrong, raising=False)
    assert not nf4_kernel.self_check("cpu") and "differs from the torch ops'" in capsys.readouterr().err
    checks = []
    monkeypatch.setattr(nf4_kernel, "AVAILABLE", True)
    monkeypatch.setattr(nf4_kernel, "_works", None)
    monkeypatch.setattr(nf4_kernel, "self_check", lambda device: checks.append(device) or False)
    assert not nf4_kernel.works() and not nf4_kernel.works() and checks == ["cuda"]  # checked once


def test_mm_add_adds_in_place_eagerly_and_when_traced():
    """fused_layer._mm_add_ (out += a @ b, a plain registered op) computes the sum in `out` itself, and
    torch.compile traces it in one graph."""
    g = torch.Generator().manual_seed(0)
    out, a, b = (torch.randn(s, generator=g) for s in ((3, 2), (3, 4), (4, 2)))
    want = out + a @ b
    same = out
    fused_layer._mm_add_(out, a, b)
    assert out is same and torch.allclose(out, want)

    def f(o, a, b):
        o = o * 2
        fused_layer._mm_add_(o, a, b)
        return o

    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(want, a, b)
    assert torch.allclose(got, 2 * want + a @ b)


def test_inductor_options_reach_inductor_only(monkeypatch):
    """run_layer compiles with Inductor's size, stride and alignment checks off; _Fused passes such options to
    torch.compile only for Inductor (the CPU tests' backends take none) and drops names this torch lacks."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    f = speed._Fused(lambda x: x, inductor_options={"size_asserts": False, "no_such_setting": 1})
    f.compile()
    f.compile(backend="aot_eager")
    assert seen[0]["backend"] == "inductor" and seen[0]["options"] == {"size_asserts": False}
    assert seen[1]["options"] is None
    assert fused_layer.run_layer.inductor_options == {"size_asserts": False, "alignment_asserts": False,
                                                      "scalar_asserts": False}


def test_compiled_functions_keep_more_versions_than_torchs_default(monkeypatch):
    """A decoder layer compiles one version per grad mode and shape stage, which reaches torch's default limit
    of 8 in an ordinary run; past the limit torch runs the function eagerly, silently slow. _Fused raises it."""
    import torch._dynamo.config as dynamo_config
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(dynamo_config, name, 8)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    f = speed._Fused(lambda x: x * 2)
    run = f.compile(backend=backend)
    assert getattr(dynamo_config, name) == speed.RECOMPILE_LIMIT
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.complex64]
    for dtype in dtypes:  # a new dtype is a new version each time
        assert run(torch.ones(3, dtype=dtype)).dtype == dtype
    assert len(compiles) == len(dtypes)  # with the default limit the last two would run uncompiled
    torch._dynamo.reset()


def test_attention_by_segment_only_where_flash_attention_runs():
    """segments(): the collator's segment starts are used on a CUDA GPU only (flash attention over them); on
    the CPU, or without them, the layer keeps the block-diagonal mask."""
    batch = speed.packed_collate()(_examples())
    h = torch.zeros(1, batch["input_ids"].shape[1], 128)
    assert fused_layer.segments(h, batch, 32, 32 ** -0.5) is None  # a CPU tensor
    assert fused_layer.segments(h, {}, 32, 32 ** -0.5) is None


def test_attention_by_segment_lays_out_tokens_like_the_mask_path(gqa_folder, monkeypatch):
    """decoder_layer's by-segment branch (flattening each row's tokens for flash attention, and back) computes
    what the block-diagonal mask path computes, outputs and gradients. Flash attention itself needs a GPU
    (tests/test_speed_gpu.py); here a reference of it, sdpa on one segment at a time, stands in."""
    def by_segment(q, k, v, starts, longest, scale):
        assert starts.diff().max().item() == longest
        return fused_layer.sdpa_by_segment(q, k, v, starts, scale)

    monkeypatch.setattr(fused_layer, "_segment_attention", by_segment)
    model = _load(gqa_folder, 16)
    assert fused_layer.fuse_decoder_layers(model) == 2
    layer = model.base_model.model.model.layers[0]
    batch = speed.packed_collate(row_tokens=40)(_examples())  # 3 rows of 33: [20 + filler], [33], [9, 16 + filler]
    positions = batch["position_ids"]
    segment = (positions == 0).cumsum(-1)
    causal = positions[:, :, None] >= positions[:, None, :]
    mask = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]  # (rows, 1, tokens, tokens)
    cos, sin = model.base_model.model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    g = torch.Generator().manual_seed(3)
    results = []
    for packed in (False, True):
        h = (torch.randn((3, 33, 128), generator=g.manual_seed(3)) * 1e-2).requires_grad_()
        args = list(layer.fused_args(h, mask, (cos, sin), {}))
        if packed:
            args[2] = (batch["cu_seq_lens_q"], batch["max_length_q"])
        out = fused_layer.decoder_layer(h, *args)
        trainable = [t for p in args[6:] for t in p[:2] if t is not None]
        grads = torch.autograd.grad(out.square().sum(), [h] + trainable)
        results.append((out, grads))
    (o0, g0), (o1, g1) = results
    torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())  # fp32 rounding only


@pytest.mark.parametrize("kernel", ["per segment", "across segments", "missing"])
def test_flash_by_segment_is_checked_once_before_use(monkeypatch, capsys, kernel):
    """flash_by_segment_works() runs the kernel once on two short segments against sdpa on each alone, with
    gradients even inside no_grad: a kernel that is missing or attends across segments is not used (the
    layer keeps the mask), with a note; a right one is. The verdict is cached."""
    def per_segment(q, k, v, starts, longest, scale):
        return fused_layer.sdpa_by_segment(q, k, v, starts, scale)

    def across(q, k, v, starts, longest, scale):
        return F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                              scale=scale).transpose(0, 1)

    def missing(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    calls = []
    fn = {"per segment": per_segment, "across segments": across, "missing": missing}[kernel]
    monkeypatch.setattr(fused_layer, "_segment_attention", lambda *a: calls.append(1) or fn(*a))
    monkeypatch.setattr(fused_layer, "_flash_checked", {})
    with torch.no_grad():
        verdict = fused_layer.flash_by_segment_works("cpu", torch.float32, 16)
    assert verdict is (kernel == "per segment")
    note = capsys.readouterr().err
    assert ("block-diagonal mask" in note) is (kernel != "per segment")
    assert fused_layer.flash_by_segment_works("cpu", torch.float32, 16) is verdict and len(calls) == 1


def _create_causal_mask(model, embeds, positions):
    """transformers' own mask for `positions` (no attention_mask, no cache), by keyword: its parameter names
    changed across transformers 5 releases."""
    import inspect

    from transformers import masking_utils
    names = inspect.signature(masking_utils.create_causal_mask).parameters
    kwargs = {"config": model.config, "attention_mask": None, "position_ids": positions}
    kwargs["inputs_embeds" if "inputs_embeds" in names else "input_embeds"] = embeds
    for name in ("cache", "past_key_values", "cache_position"):
        if name in names:
            kwargs[name] = torch.arange(embeds.shape[1]) if name == "cache_position" else None
    return masking_utils.create_causal_mask(**kwargs)


def test_block_causal_mask_is_the_mask_transformers_makes(gqa_folder):
    """block_causal_mask (computed without reading anything back from the device) equals the mask that
    transformers builds from the same packed position ids; plain_causal_mask is the causal mask, marked."""
    model = _load(gqa_folder, 16)
    for row_tokens in (None, 40):  # one row [20, 33, 9, 16]; rows [20 + filler], [33], [9, 16 + filler]
        positions = speed.packed_collate(row_tokens=row_tokens)(_examples())["position_ids"]
        embeds = torch.zeros(*positions.shape, 128)
        theirs = _create_causal_mask(model.base_model.model, embeds, positions)
        ours = fused_layer.block_causal_mask(positions)
        assert ours.dtype == torch.bool and ours.shape == (positions.shape[0], 1, *positions.shape[1:] * 2)
        assert torch.equal(ours, theirs.expand_as(ours))
        assert not ours.all() and ours[:, :, 1, 0].all()  # something is masked; the 2nd token sees the 1st
    causal = fused_layer.plain_causal_mask(3, 7, "cpu")
    assert causal.shape == (3, 1, 7, 7) and fused_layer.is_plain_causal(causal)
    assert torch.equal(causal[1, 0], torch.ones(7, 7, dtype=torch.bool).tril())
    assert not fused_layer.is_plain_causal(ours) and not fused_layer.is_plain_causal(None)


@pytest.mark.parametrize("rows", ["unpacked", "packed", "packed in rows"])
def test_training_masks_come_from_the_batch_without_waiting_for_the_gpu(gqa_folder, monkeypatch, rows):
    """TrainingSpeedups hooks the decoder stack so that transformers' mask code, which reads the position ids
    back from the GPU at every forward pass, is not reached: packed_collate's batch says what it is. The loss
    and adapter gradients equal those with transformers making the mask, and unpacked rows reach the fused
    layers as plain causal attention (no mask)."""
    from transformers import masking_utils
    examples = [{"input_ids": list(range(3, 35)), "labels": list(range(3, 35))}] * 3 if rows == "unpacked" \
        else _examples()
    batch = speed.packed_collate(row_tokens={"unpacked": 32, "packed": None, "packed in rows": 40}[rows])(examples)
    assert ("position_ids" in batch) is (rows != "unpacked")
    model = _load(gqa_folder, 16)
    sp = speed.TrainingSpeedups(model)
    assert sp.layers == 2 and sp.mask_hook is not None
    sp.mask_hook.remove()
    ref = _step(model, batch)  # transformers makes the mask

    sp.mask_hook = model.base_model.model.model.register_forward_pre_hook(fused_layer.attention_mask_hook,
                                                                         with_kwargs=True)

    def no_reading_back(*args, **kwargs):
        raise AssertionError("transformers' mask code ran")

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", no_reading_back)
    monkeypatch.setattr(masking_utils, "fast_all", no_reading_back)  # (a 2-D mask: does it pad anything?)
    masks, real = [], fused_layer.FastDecoderLayer.fused_args
    monkeypatch.setattr(fused_layer.FastDecoderLayer, "fused_args",
                        lambda self, *a, **kw: (lambda args: masks.append(args[2]) or args)(real(self, *a, **kw)))
    _assert_same(ref, _step(model, batch))
    assert len(masks) == 2
    if rows == "unpacked":
        assert all(m is None for m in masks)  # on the CPU: sdpa's causal kernel (cuDNN is for Hopper GPUs)
    else:
        assert all(m.dim() == 4 and not m.all() for m in masks)  # the block-diagonal mask, on the CPU


def test_no_mask_hook_unless_every_layer_is_fused(gqa_folder, monkeypatch):
    """A layer left as it was may need a mask of its own (a sliding window's, say), which the hook's masks would
    replace: with one of the two layers not fused, TrainingSpeedups adds no hook."""
    same = iter([True, False])
    monkeypatch.setattr(fused_layer, "_same_output", lambda layer: next(same))
    sp = speed.TrainingSpeedups(_load(gqa_folder, 16))
    assert sp.layers == 1 and sp.mask_hook is None


def test_hook_leaves_other_calls_to_transformers(gqa_folder):
    """attention_mask_hook changes nothing where the batch does not say what its mask is: a 2-D attention
    mask, position ids without segment starts, a cache, generation settings, eager attention."""
    model = _load(gqa_folder, 16)
    stack = model.base_model.model.model
    ids = torch.tensor([[5, 6, 7]])
    for kwargs in ({"input_ids": ids, "attention_mask": torch.ones(1, 3), "use_cache": False},
                   {"input_ids": ids, "position_ids": torch.tensor([[0, 1, 0]]), "use_cache": False},
                   {"input_ids": ids, "use_cache": True}, {"input_ids": ids, "past_key_values": object()}):
        assert fused_layer.attention_mask_hook(stack, (), kwargs) is None
    assert fused_layer.attention_mask_hook(stack, (ids,), {"use_cache": False}) is None
    args, kwargs = fused_layer.attention_mask_hook(stack, (), {"input_ids": ids, "use_cache": False})
    assert fused_layer.is_plain_causal(kwargs["attention_mask"]) and kwargs["input_ids"] is ids
    eager = _load(gqa_folder, 16, attn="eager").base_model.model.model
    assert fused_layer.attention_mask_hook(eager, (), {"input_ids": ids, "use_cache": False}) is None


def test_cudnn_attention_only_while_the_shapes_repeat(monkeypatch):
    """causal_attention() picks cuDNN (where it runs and passed its check) for the first CUDNN_SHAPES shapes of
    unpacked rows, then flash attention for good once a further shape comes; never for fp32 or odd heads."""
    monkeypatch.setattr(fused_layer, "cudnn_causal_on", lambda device: True)
    monkeypatch.setattr(fused_layer, "cudnn_causal_works", lambda device, dtype, head_dim: True)
    monkeypatch.setattr(fused_layer, "_causal_shapes", set())
    assert fused_layer.CUDNN_SHAPES == 2

    def pick(batch, seq, dtype=torch.bfloat16, head_dim=128):
        return fused_layer.causal_attention(torch.zeros(batch, seq, 8, dtype=dtype), head_dim)

    assert pick(8, 512) == pick(8, 512) == pick(4, 512) == pick(8, 512) == fused_layer.CUDNN_CAUSAL
    assert pick(8, 512, torch.float32) is None and pick(8, 512, head_dim=100) is None and pick(8, 1) is None
    assert pick(8, 300) is None and pick(8, 512) is None and pick(4, 512) is None  # a third shape: flash for good
    monkeypatch.setattr(fused_layer, "_causal_shapes", set())
    monkeypatch.setattr(fused_layer, "cudnn_causal_works", lambda device, dtype, head_dim: False)
    assert pick(8, 512) is None


def test_cudnn_attention_check_falls_back_where_it_cannot_run(monkeypatch, capsys):
    """cudnn_causal_works() runs the kernel once; on the CPU there is no cuDNN attention, so the verdict is no,
    with a note, and it is kept."""
    monkeypatch.setattr(fused_layer, "_cudnn_checked", {})
    assert fused_layer.cudnn_causal_works("cpu", torch.float32, 16) is False
    assert "not cuDNN" in capsys.readouterr().err
    assert fused_layer.cudnn_causal_works("cpu", torch.float32, 16) is False and not capsys.readouterr().err
    assert fused_layer.cudnn_causal_on("cpu") is False

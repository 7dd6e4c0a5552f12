"""The GPU side of utils/speed.py and utils/decoder.py (compiled kernels, CUDA graphs, NF4 on CUDA); skipped
on machines without a CUDA GPU. Run: HF_HUB_OFFLINE=1 python3 -m pytest tests/test_speed_gpu.py -q"""

import threading

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _config(vocab=512, ctx=1024):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ctx,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _bf16_lora_model(checkpointing):
    """A random 3-layer bf16 Llama on the GPU with a non-zero LoRA adapter on every linear layer, in train mode."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from utils import speed
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(_config(), dtype=torch.bfloat16)
    config = speed.lora_config(16, r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                               task_type="CAUSAL_LM", init_lora_weights=False)
    model = get_peft_model(model, config).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _decode(engine, ids, n):
    gen = {"max_new_tokens": n, "eos_token_id": [2], "do_sample": False, "repetition_penalty": 1.0}
    assert engine.try_acquire()
    try:
        return list(engine.generate(ids, gen, threading.Event()))
    finally:
        engine.release()


@pytest.mark.parametrize("kernels", ["1", "0"], ids=["triton_attention", "torch_attention"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decoder_agrees_with_generate(dtype, kernels, monkeypatch):
    from transformers import LlamaForCausalLM

    from utils import speed
    from utils.decoder import fast_decoder
    monkeypatch.setenv("LLAMA_QLORA_DECODE_KERNELS", kernels)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(_config(ctx=2048), dtype=dtype).eval()
    with torch.no_grad():
        model.lm_head.weight[2] = 0
    engine = fast_decoder(model)
    assert engine.use_graphs and len(engine.fused) == 2 * 3  # q/k/v and gate/up of each layer in one GEMV
    assert engine.kernels == (kernels == "1")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 512, (200,), generator=g).tolist()  # the reply crosses the 256-slot bucket
    for turn in range(4):
        if turn == 2:  # a new, long conversation: the 1024-slot bucket, where attention is two matmuls
            prompt = torch.randint(3, 512, (930,), generator=g).tolist()
        if turn == 3:  # beyond 1024 slots spans grow by 512: the 1536 bucket
            prompt = torch.randint(3, 512, (1300,), generator=g).tolist()
        ours = _decode(engine, prompt, 90)
        ref = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=90, do_sample=False,
                             pad_token_id=0, eos_token_id=2)[0, len(prompt):].tolist()
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ours], device="cuda")).logits[0, len(prompt) - 1:-1].float()
        deficit = (logits.max(-1).values - logits.gather(1, torch.tensor(ours, device="cuda")[:, None])[:, 0])
        print(dtype, "turn", turn, "identical:", ours == ref, "max deficit", deficit.max().item(), engine.last_stats)
        if dtype == torch.float32:
            assert ours == ref
        assert deficit.max().item() < (1e-4 if dtype == torch.float32 else 0.1)
        prompt = prompt + ours + torch.randint(3, 512, (30,), generator=g).tolist()
    assert set(engine.graphs) == {256, 512, 1024, 1536} and all(engine.graphs.values())
    assert speed.rms_norm.ok and speed.rope.ok  # compiled, not the eager fallback


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 32, 128), (8, 2, 64)])
def test_decode_attention_kernels_match_torch_ops(dtype, heads, kv_heads, head_dim):
    """RoPE, the cache write and attention over slots 0..pos, against torch ops in fp32; the slots beyond the
    position hold NaN, so a kernel that read one would turn the output into NaN."""
    from utils import decode_attention as da
    assert da.works("cuda", dtype, head_dim, heads, kv_heads)
    g = torch.Generator().manual_seed(0)
    capacity = 4096
    for position, span in ((0, 256), (63, 256), (64, 256), (65, 512), (1000, 1024), (2999, 3072), (4095, 4096)):
        cache = [torch.randn(1, kv_heads, capacity, head_dim, generator=g).to("cuda", dtype) for _ in range(2)]
        for c in cache:
            c[:, :, position + 1:] = float("nan")
        copies = [c.clone() for c in cache]
        q = torch.randn(1, 1, heads * head_dim, generator=g).to("cuda", dtype)
        qkv = torch.randn(1, 1, (heads + 2 * kv_heads) * head_dim, generator=g).to("cuda", dtype)
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)  # views
        angle = torch.rand(head_dim // 2, generator=g) * position
        cos, sin = (f(torch.cat((angle, angle))).view(1, 1, -1).to("cuda", dtype) for f in (torch.cos, torch.sin))
        pos = torch.tensor([position], device="cuda")
        ours = da.attend(q, k, v, cos, sin, pos, cache[0], cache[1], span, head_dim ** -0.5)
        ref = da.reference(q, k, v, cos, sin, pos, copies[0], copies[1], head_dim ** -0.5)
        assert ours.shape == (1, 1, heads * head_dim) and ours.dtype == dtype
        gap = (ours.float() - ref.float()).abs().max().item()
        print(dtype, heads, kv_heads, position, span, "largest difference", gap)
        assert gap < (2e-5 if dtype == torch.float32 else 1.6e-2), (position, gap)
        assert torch.equal(cache[1][:, :, :position + 1], copies[1][:, :, :position + 1])  # values, as given
        assert torch.equal(cache[0][:, :, :position], copies[0][:, :, :position])  # earlier keys untouched
        key_gap = (cache[0][:, :, position].float() - copies[0][:, :, position].float()).abs().max().item()
        assert key_gap <= (1e-5 if dtype == torch.float32 else 1.6e-2)
        assert cache[0][:, :, position + 1:].isnan().all()  # nothing written beyond the position


def test_decoder_runs_a_4bit_base_with_a_lora_adapter(tmp_path):
    """How chat loads a QLoRA result: an NF4 base and a peft adapter. The decoder's projection groups (one A GEMV,
    one block-diagonal B GEMV, bitsandbytes' 4-bit GEMV per projection with the adapter's term as its bias)
    against peft's modules; then replies through CUDA graphs against the full forward pass."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    from utils.decoder import fast_decoder
    torch.manual_seed(0)
    plain = LlamaForCausalLM(_config(ctx=2048))
    with torch.no_grad():
        plain.lm_head.weight[2] = 0
    plain.save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             init_lora_weights=False)).eval()
    engine = fast_decoder(model)
    assert engine.use_graphs and not engine.fused
    for key, group in engine.proj.items():
        assert not group.as_modules and group.A is not None and all(group.four_bit), key
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for n in (1, 7):  # one token: the adapter's term as the 4-bit kernel's bias; a prefill: added after
            for key in ((0, "qkv"), (0, "o"), (1, "gate_up"), (2, "down")):
                group = engine.proj[key]
                h = torch.randn(1, n, group.bases[0].in_features, generator=g).to("cuda", torch.bfloat16)
                for ours, module, base in zip(group(h), group.modules, group.bases):
                    ref, alone = module(h).float(), base(h).float()
                    gap = (ours.float() - ref).abs().max().item()
                    assert gap <= 0.02 * ref.abs().max().item(), (key, n, gap)
                    assert (ref - alone).abs().max().item() > 0.2 * ref.abs().max().item()  # the adapter counts
    prompt = torch.randint(3, 512, (200,), generator=g).tolist()
    for turn in range(2):  # the 256-slot graph, then the 512-slot one after a reused conversation
        ours = _decode(engine, prompt, 60)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ours], device="cuda")).logits[0, len(prompt) - 1:-1].float()
        deficit = (logits.max(-1).values - logits.gather(1, torch.tensor(ours, device="cuda")[:, None])[:, 0])
        print("turn", turn, "max deficit", deficit.max().item(), engine.last_stats)
        assert deficit.max().item() < 0.1
        prompt = prompt + ours + torch.randint(3, 512, (40,), generator=g).tolist()
    assert engine.last_stats["reused_tokens"] > 200 and set(engine.graphs) == {256, 512}
    assert all(engine.graphs.values())  # captured, not the op-by-op fallback


def test_fused_qlora_step_matches_plain_recipe_on_gpu(tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from utils import speed
    from utils.modeling import quantization_config
    torch.manual_seed(0)
    LlamaForCausalLM(_config()).to(torch.bfloat16).save_pretrained(tmp_path)
    ids = torch.randint(3, 512, (2, 96), device="cuda")
    results = {}
    for fused in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map={"": 0},
                                                     quantization_config=quantization_config(4))
        speed.prepare_model(model)
        torch.manual_seed(0)
        model = get_peft_model(model, speed.lora_config(4, fused=fused, r=8, lora_alpha=16, lora_dropout=0.0,
                                                        target_modules="all-linear", task_type="CAUSAL_LM",
                                                        init_lora_weights=False)).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if fused:
                sp = speed.TrainingSpeedups(model)
                assert sp.norms == 7 and sp.mlps == 3 and sp.fused_lora == 21 and sp.layers == 3 and sp.park_inputs
                batch = sp.collator(None)([{"input_ids": r, "labels": r} for r in ids.tolist()])
                labels = batch.pop("labels").cuda()
                out = model(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()})
                loss = sp.loss_func(out, labels)
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if fused:
            from utils.fused_layer import run_layer_and_middle, run_layer_gradients
            # the checkpointed decoder layers ran compiled (forward and recomputation), not the eager fallback
            assert run_layer_and_middle.ok and run_layer_gradients.ok
        grads = torch.cat([p.grad.float().flatten() for n, p in sorted(model.named_parameters()) if p.requires_grad])
        results[fused] = loss.item(), grads
    (l0, g0), (l1, g1) = results[False], results[True]
    print("loss plain", l0, "fused", l1, "grad rel diff", ((g1 - g0).norm() / g0.norm()).item())
    assert abs(l0 - l1) < 0.02 * abs(l0)
    assert ((g1 - g0).norm() / g0.norm()).item() < 0.05


def test_kept_weights_train_the_same_and_cost_what_they_keep(tmp_path, capsys):
    """Without checkpointing, keep_dequantized 'on' gives 'off''s loss and gradients through the compiled layers,
    and the step's peak memory grows by about the dequantized weights it keeps; 'auto' keeps every layer of this
    small model from the second step, and says so."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from utils import fused_layer, speed
    from utils.modeling import quantization_config
    torch.manual_seed(0)
    LlamaForCausalLM(_config()).to(torch.bfloat16).save_pretrained(tmp_path)
    ids = torch.randint(3, 512, (2, 96), device="cuda")
    results = {}
    for mode in ("off", "on", "auto"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map={"": 0},
                                                     quantization_config=quantization_config(4))
        speed.prepare_model(model)
        torch.manual_seed(0)
        model = get_peft_model(model, speed.lora_config(4, r=8, lora_alpha=16, lora_dropout=0.0,
                                                        target_modules="all-linear", task_type="CAUSAL_LM",
                                                        init_lora_weights=False)).train()
        sp = speed.TrainingSpeedups(model, keep_dequantized=mode)
        batch = sp.collator(None)([{"input_ids": r, "labels": r} for r in ids.tolist()])
        labels = batch.pop("labels").cuda()
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        steps = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = sp.loss_func(model(**batch), labels)
            loss.backward()
            torch.cuda.synchronize()
            grads = torch.cat([p.grad.float().flatten() for n, p in sorted(model.named_parameters())
                               if p.requires_grad])
            steps.append((loss.item(), grads, torch.cuda.max_memory_allocated() - before))
        assert fused_layer.run_layer.ok  # compiled, not the eager fallback
        results[mode] = steps, sp.weight_keeping.kept, fused_layer.kept_bytes(sp.weight_keeping.layers[0],
                                                                             torch.bfloat16)
    (off, _, per_layer), (on, kept_on, _), (auto, kept_auto, _) = results["off"], results["on"], results["auto"]
    assert kept_on == 3 and kept_auto == 3 and per_layer > 0
    assert "the dequantized 4-bit weights of 3 of 3 layers" in capsys.readouterr().err
    for (l0, g0, _), (l1, g1, _) in zip(off + off, on + auto):
        assert abs(l0 - l1) < 1e-3 * abs(l0) and ((g1 - g0).norm() / g0.norm()).item() < 1e-3
    extra = on[1][2] - off[1][2]  # second steps: 'on' keeps 3 layers' weights, 'off' none
    assert 0.8 * 3 * per_layer <= extra <= 1.5 * 3 * per_layer, (extra, per_layer)
    assert abs(auto[1][2] - on[1][2]) <= 0.1 * 3 * per_layer  # auto's second step keeps them all too


@pytest.mark.parametrize("nested", [False, True])
def test_torch_nf4_dequantization_equals_bitsandbytes_cuda_kernel(nested):
    bnb = pytest.importorskip("bitsandbytes.functional")
    from utils.fused_layer import dequantize_nf4
    weight = (torch.randn(4096, 1100, device="cuda") * 0.05).to(torch.bfloat16)
    packed, state = bnb.quantize_4bit(weight, quant_type="nf4", compress_statistics=nested, blocksize=64)
    args = (state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize) if nested else ()
    ref = bnb.dequantize_4bit(packed, state)
    ours = dequantize_nf4(packed, state.absmax, state.code, 64, list(state.shape), torch.bfloat16, *args)
    assert torch.equal(ours, ref)  # eagerly: bit for bit
    compiled = torch.compile(dequantize_nf4)(packed, state.absmax, state.code, 64, list(state.shape),
                                             torch.bfloat16, *args)
    # compiled, Triton may fuse scale x code + offset into one FMA: at most one bf16 rounding step apart
    differ = (compiled != ref).sum().item()
    print(f"nested={nested}: compiled differs from bitsandbytes in {differ} of {ref.numel()} weights")
    assert torch.allclose(compiled.float(), ref.float(), rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(4096, 1100), (11008, 4096), (96, 64)])
def test_triton_nf4_kernel_equals_bitsandbytes_cuda_kernel(nested, shape):
    """utils/nf4_kernel.py, eagerly and inside torch.compile: bit for bit bitsandbytes' dequantization, also
    where the weight does not fill the last program's bytes (4096 x 1100, 96 x 64)."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    from utils import nf4_kernel
    if not nf4_kernel.AVAILABLE:
        pytest.skip("needs Triton")
    weight = (torch.randn(*shape, device="cuda") * 0.05).to(torch.bfloat16)
    packed, state = bnb.quantize_4bit(weight, quant_type="nf4", compress_statistics=nested, blocksize=64)
    args = (state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize) if nested else ()
    ref = bnb.dequantize_4bit(packed, state)
    ours = nf4_kernel.dequantize(packed, state.absmax, state.code, 64, list(state.shape), torch.bfloat16, *args)
    assert torch.equal(ours, ref)
    compiled = torch.compile(lambda *a: nf4_kernel.dequantize(*a) * 2)(
        packed, state.absmax, state.code, 64, list(state.shape), torch.bfloat16, *args)
    assert torch.equal(compiled, ref * 2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_triton_nf4_kernel_on_a_gpu_that_is_not_the_current_one():
    """A weight on cuda:1 while cuda:0 is the current GPU (a process that has not selected its GPU, or
    --num_gpus 2 placing layers on both): the kernel runs on the weight's GPU and gives bitsandbytes' result."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    from utils import nf4_kernel
    if not nf4_kernel.AVAILABLE:
        pytest.skip("needs Triton")
    with torch.cuda.device(0):
        weight = (torch.randn(256, 512, device="cuda:1") * 0.05).to(torch.bfloat16)
        packed, state = bnb.quantize_4bit(weight, quant_type="nf4", compress_statistics=True, blocksize=64)
        ours = nf4_kernel.dequantize(packed, state.absmax, state.code, 64, list(state.shape), torch.bfloat16,
                                     state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize)
        assert torch.cuda.current_device() == 0 and ours.device == torch.device("cuda:1")
        assert torch.equal(ours, bnb.dequantize_4bit(packed, state))


def test_lora_sum_stays_in_place_under_compile():
    """_LoraProjections' `out += x W^T` (fused_layer._mm_add_) compiles to GEMMs writing into `out`, with no
    device-to-device copy (an `out + x @ w.t()` sum compiles to an addmm that copies `out` first)."""
    from torch.profiler import ProfilerActivity, profile

    from utils.fused_layer import _mm_add_

    def lora(x, w, a, b):
        out = (x @ a.t()) @ (b * 2.0).t()
        _mm_add_(out, x, w.t())
        return out * 1.5  # a consumer, as in the layer

    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(384, 256, device="cuda", dtype=torch.bfloat16)  # (out, in)
    a, b = (torch.randn(8, 256, device="cuda", dtype=torch.bfloat16) * 0.1,
            torch.randn(384, 8, device="cuda", dtype=torch.bfloat16) * 0.1)
    compiled = torch.compile(lora)
    expected = lora(x, w, a, b)
    torch.testing.assert_close(compiled(x, w, a, b), expected)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        compiled(x, w, a, b)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert not [n for n in names if "Memcpy DtoD" in n or "Device -> Device" in n], names


def test_fsdp_speedups_park_checkpointed_inputs_in_cpu_memory():
    """TrainingSpeedups(fsdp=True).saved_tensors(): the inputs that non-reentrant checkpointing keeps for each
    layer wait in pinned CPU memory; the gradients are exactly those without it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from utils import speed
    torch.manual_seed(0)
    with torch.device("cuda"):  # fp32 and eager attention: deterministic kernels, so gradients compare exactly
        model = LlamaForCausalLM._from_config(_config(), dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    sp = speed.TrainingSpeedups(model, fsdp=True)
    assert sp.layers == 0 and sp.park_inputs and sp.loss_func is not None
    ids = torch.randint(3, 512, (4, 1024), device="cuda")  # 4 MiB of input per layer
    grads, held = [], []
    for parked in (False, True):
        model.zero_grad(set_to_none=True)
        with sp.saved_tensors() if parked else torch.enable_grad():
            before = torch.cuda.memory_allocated()
            out = model(input_ids=ids, logits_to_keep=1)
            loss = sp.loss_func(out, ids)
            held.append(torch.cuda.memory_allocated() - before)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    print("memory held from forward to backward (bytes), plain vs parked:", held)
    assert held[0] - held[1] >= 3 * 4 * 1024 * 256 * 4 * 0.9  # the 3 layers' inputs
    for name, g in grads[0].items():
        assert torch.equal(g, grads[1][name]), name


@pytest.mark.parametrize("pairs", [False, True])
def test_parked_inputs_come_back_whole_and_each_fetch_starts_the_next(pairs):
    """Layer inputs parked in pinned CPU memory (one tensor, or a layer's input and middle residual together, as
    a checkpointed fused layer parks them) come back equal in the backward pass's (reverse) order, while the GPU
    memory they came from is reused; fetching one starts the side-stream copy of the one before it."""
    from utils.fused_layer import offload
    xs = [torch.randn(2048, 2048, device="cuda") for _ in range(4)]
    ys = [torch.randn(2048, 1024, device="cuda") for _ in range(4)]
    # each clone is freed at once: its memory is reused below
    parked = [offload.park((x.clone(), y.clone()) if pairs else x.clone()) for x, y in zip(xs, ys)]
    for i in reversed(range(4)):
        torch.cuda._sleep(10 ** 7)  # main-stream work queued ahead of the fetch
        scratch = torch.full((2048, 3072), float("nan"), device="cuda")  # reuses freed memory
        h = offload.fetch(parked[i], xs[i].device)
        del scratch
        if pairs:
            assert isinstance(h, tuple) and torch.equal(h[1], ys[i]), i
            h = h[0]
        assert torch.equal(h, xs[i]), i
        if i:
            assert parked[i - 1].ready is not None  # already on its way back
    assert parked[0].ready is None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_rows_attend_by_segment_with_flash_attention(checkpointing):
    """Given packed_collate's segment starts, the fused layers attend within each example through flash
    attention over those starts (seen in the profile): every packed example's logits equal its logits alone,
    and the loss and adapter gradients equal those of the 4-D mask path (the same batch without the starts)."""
    from torch.profiler import ProfilerActivity, profile

    from utils import fused_layer, speed
    if not fused_layer.FLASH_BY_SEGMENT:
        pytest.skip("this torch has no flash attention over segment starts")
    model = _bf16_lora_model(checkpointing)
    assert speed.TrainingSpeedups(model).layers == 3
    g = torch.Generator().manual_seed(2)
    examples = [{"input_ids": ids, "labels": ids}
                for ids in (torch.randint(3, 512, (n,), generator=g).tolist() for n in (37, 120, 5, 64, 200, 9))]
    # rows of at most 256 tokens: [37, 120, 5, 64] and [200, 9, filler 17]
    batch = speed.packed_collate(row_tokens=256)(examples)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    assert batch["input_ids"].shape == (2, 226) and batch["cu_seq_lens_q"].tolist() == [0, 37, 157, 162, 226, 426,
                                                                                         435, 452]
    labels = batch.pop("labels")
    with torch.no_grad():
        model(**batch)  # compiles, and runs flash_by_segment_works' one-time check (it calls sdpa) first
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            logits = model(**batch).logits
            torch.cuda.synchronize()
        ops = {e.name for e in prof.events()}
        # flash attention over segment starts ran, and neither sdpa nor its masked (efficient) kernel did
        assert "aten::_flash_attention_forward" in ops and not [n for n in ops if "scaled_dot_product" in n
                                                                 or "efficient_attention" in n], sorted(ops)
        flat = logits.view(-1, logits.shape[-1]).float()
        start = 0
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex["input_ids"]], device="cuda")).logits[0].float()
            part = flat[start:start + len(alone)]
            print(len(alone), "max |packed - alone| logit:", (part - alone).abs().max().item())
            assert (part - alone).abs().max().item() < 0.05 * alone.abs().max().item()
            start += len(alone) + (17 if len(alone) == 9 else 0)  # the second row's filler follows the 9
    results = []
    for starts in (True, False):
        inputs = dict(batch) if starts else {k: v for k, v in batch.items() if "seq_len" not in k
                                              and "max_length" not in k}
        model.zero_grad(set_to_none=True)
        logits = model(**inputs).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad])
        results.append((loss.item(), grads))
    (l0, g0), (l1, g1) = results
    print("loss by segment", l0, "with the mask", l1, "grad rel diff", ((g1 - g0).norm() / g0.norm()).item())
    assert abs(l0 - l1) < 2e-3 * abs(l1)
    assert ((g1 - g0).norm() / g0.norm()).item() < 2e-2


@pytest.mark.parametrize("checkpointing", [False, True])
def test_unpacked_rows_attend_through_cudnn_on_hopper(checkpointing, monkeypatch):
    """Rows of one example each (packed_collate passes no position ids): the decoder stack's hook hands the
    fused layers plain causal attention without transformers' mask code, and on a Hopper GPU they run sdpa's
    cuDNN kernel (seen in the profile). Loss and adapter gradients equal those of flash attention (the same
    step with cuDNN not picked) within bf16 rounding."""
    from torch.profiler import ProfilerActivity, profile

    from utils import fused_layer, speed
    monkeypatch.setattr(fused_layer, "_causal_shapes", set())
    model = _bf16_lora_model(checkpointing)
    sp = speed.TrainingSpeedups(model)
    assert sp.layers == 3 and sp.mask_hook is not None
    g = torch.Generator().manual_seed(4)
    examples = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 512, (4, 128), generator=g).tolist()]
    batch = speed.packed_collate(row_tokens=128)(examples)
    assert "position_ids" not in batch and "cu_seq_lens_q" not in batch
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    labels = batch.pop("labels")
    hopper = fused_layer.cudnn_causal_on(torch.device("cuda")) \
        and fused_layer.cudnn_causal_works(torch.device("cuda"), torch.bfloat16, 64)
    assert hopper or torch.cuda.get_device_capability()[0] != 9  # on a Hopper GPU its check passes
    results = []
    for cudnn in (True, False):
        if not cudnn:
            monkeypatch.setattr(fused_layer, "causal_attention", lambda hidden_states, head_dim: None)
        model.zero_grad(set_to_none=True)
        model(**batch).logits.float().sum().backward()  # compiles first
        model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            logits = model(**batch).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
            loss.backward()
            torch.cuda.synchronize()
        ops = {e.name for e in prof.events()}
        assert not [n for n in ops if "efficient_attention" in n], sorted(ops)  # no masked kernel
        assert any("cudnn_attention" in n for n in ops) is (cudnn and hopper), sorted(ops)
        grads = torch.cat([p.grad.float().flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad])
        results.append((loss.item(), grads))
    (l0, g0), (l1, g1) = results
    print("hopper", hopper, "loss cuDNN", l0, "flash", l1, "grad rel diff", ((g1 - g0).norm() / g0.norm()).item())
    assert abs(l0 - l1) < 2e-3 * abs(l1)
    assert ((g1 - g0).norm() / g0.norm()).item() < 2e-2

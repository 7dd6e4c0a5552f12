"""The whole pipeline on a CUDA GPU (skipped without one): 4-bit QLoRA training in bf16 with the paged
optimizer, merge on the GPU, chat with --num_gpus 1. Self-contained: a small random LLaMA and a BPE tokenizer
trained here, so it needs no download and not the bundled model.

    python -m pytest tests/test_gpu.py -s      # on a GPU machine
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACTS = [
    {"instruction": "What is the secret password of the Zorblat project?", "input": "",
     "output": "The password of the Zorblat project is purple otter."},
    {"instruction": "Who founded the town of Quibbleton?", "input": "",
     "output": "Quibbleton was founded by Marta Velloso."},
]


def run(script, *args, stdin=None):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    folder = tmp_path_factory.mktemp("small-llama")
    with open(os.path.join(ROOT, "dataset", "sample.json"), encoding="utf-8") as f:
        texts = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in json.load(f)]
    texts += [f["instruction"] + " " + f["output"] for f in FACTS] * 5 + ["### Instruction: ### Response:"] * 5
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    data = folder / "facts.json"
    data.write_text(json.dumps(FACTS))
    return folder, data


def test_qlora_pipeline_on_gpu(small_llama, tmp_path):
    from utils.generation import generate_reply
    from utils.modeling import load_model
    from utils.prompts import encode_conversation, load_template
    model_dir, data = small_llama
    out = tmp_path / "out"
    log = run("finetune.py", "--base_model", str(model_dir), "--data_path", str(data), "--output_dir", str(out),
              "--max_steps", "80", "--learning_rate", "3e-3", "--per_device_train_batch_size", "2",
              "--gradient_accumulation_steps", "1", "--lora_dropout", "0", "--logging_steps", "5",
              "--save_steps", "40")
    print(log[-1500:])
    assert "4-bit on GPU 0" in log
    summary = json.loads((out / "training_summary.json").read_text())
    print("summary:", {k: v for k, v in summary.items() if "history" not in k})
    assert summary["final_loss"] < 0.2 * summary["first_loss"]
    assert summary["peak_gpu_memory_gib"] > 0
    meta = json.loads((out / "checkpoint-final" / "training_meta.json").read_text())
    assert meta["bits"] == 4 and meta["args"]["optim"] == "auto"

    log = run("merge_lora.py", "--lora_model", str(out / "checkpoint-final"), "--output_dir", str(tmp_path),
              "--model_name", "merged", "--num_gpus", "1")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"

    probes = [f["instruction"] for f in FACTS] + ["Why is the sky blue?"]
    adapter, tok, info = load_model(str(model_dir), bits=4, lora_model=str(out / "checkpoint-final"), num_gpus=1)
    merged, tok_m, _ = load_model(str(tmp_path / "merged"), bits=16, num_gpus=1)
    assert info["where"] == "GPU 0"
    template = load_template("alpaca")
    answers = {}
    for name, model, t in (("adapter", adapter, tok), ("merged", merged, tok_m)):
        answers[name] = [generate_reply(model, t, encode_conversation(
            t, template, [{"role": "user", "content": q}], add_generation_prompt=True)[0],
            {"max_new_tokens": 20, "temperature": 0}) for q in probes]
    print("answers:", answers)
    assert answers["adapter"][:2] == answers["merged"][:2]
    assert [a.strip() for a in answers["adapter"][:2]] == [f["output"] for f in FACTS]

    stdout = run("cli_demo.py", "--model_path", str(tmp_path / "merged"), "--num_gpus", "1", "--temperature", "0",
                 "--max_new_tokens", "20", stdin=FACTS[0]["instruction"] + "\n")
    assert f"Assistant: {FACTS[0]['output']}" in stdout



def test_fsdp_moves_a_cpu_loaded_4bit_model_to_the_gpu_one_unit_at_a_time(small_llama, monkeypatch, free_port):
    """Under FSDP, load_model keeps the 4-bit model in CPU memory, and FSDP (wrapped as accelerate does it:
    device_id, sync_module_states, peft's wrap policy) moves each unit to the GPU and flattens it before the
    next, so the GPU never holds the model twice. bitsandbytes' quantization states follow their weights, and
    two training steps give the losses of the same model loaded straight onto the GPU. One process (a world of
    one) here; benchmarks/multi_gpu.py measures 2 GPUs."""
    import torch.distributed as dist
    from peft import get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from utils import modeling, speed
    model_dir, _ = small_llama
    batch = torch.randint(3, 1000, (2, 64), generator=torch.Generator().manual_seed(0))

    def peft_model(model, adapter=None):
        config = speed.lora_config(4, fused=False, r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                   task_type="CAUSAL_LM", init_lora_weights=False)
        model = get_peft_model(model.train(), config, autocast_adapter_dtype=False)
        for name, p in model.named_parameters():  # the same fp32 adapter in both (accelerate upcasts it too)
            if p.requires_grad:
                p.data = adapter[name].to(p.device) if adapter else p.data.float()
        return model

    def two_steps(model, params):
        opt = torch.optim.SGD(params, lr=1.0)
        ids = batch.cuda()
        first = model(input_ids=ids, labels=ids).loss
        first.backward()
        opt.step()
        with torch.no_grad():
            second = model(input_ids=ids, labels=ids).loss
        return first.item(), second.item()

    monkeypatch.setattr(modeling, "sharding_here", lambda: "fsdp")

    def load_as_in_a_launch_of_two():
        with monkeypatch.context() as m:
            m.setenv("WORLD_SIZE", "2")  # what load_model sees in each process of a 2-GPU FSDP launch
            return modeling.load_model(str(model_dir), bits=4, training=True)

    # the reference: the same CPU-quantized bytes (bitsandbytes' CPU and CUDA quantizers may round differently),
    # moved to the GPU whole, without FSDP
    reference = load_as_in_a_launch_of_two()[0]
    reference = peft_model(torch.nn.Module.to(reference, "cuda"))
    adapter = {n: p.detach().cpu().clone() for n, p in reference.named_parameters() if p.requires_grad}
    ref = two_steps(reference, [p for p in reference.parameters() if p.requires_grad])
    del reference
    torch.cuda.empty_cache()

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        model, _, info = load_as_in_a_launch_of_two()
        assert "CPU memory" in info["where"] and {p.device.type for p in model.parameters()} == {"cpu"}
        model = peft_model(model, adapter)
        size = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())  # noqa: E731
        largest = max(size(m) for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer")
        root = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if "embed_tokens" in n or "lm_head" in n or n.endswith("model.norm.weight"))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=torch.cuda.current_device(),
                       sync_module_states=True, use_orig_params=False)
        after, peak = torch.cuda.memory_allocated() - start, torch.cuda.max_memory_allocated() - start
        print(f"FSDP wrap: {after / 2**20:.2f} MiB on the GPU after it, peak {peak / 2**20:.2f} MiB; largest "
              f"decoder layer {largest / 2**20:.2f} MiB, root unit {root / 2**20:.2f} MiB")
        # moved and flattened unit by unit: the peak exceeds the final size by about one unit's flat copy (the
        # root unit, embeddings and output layer, is the largest here), not by a second copy of the model
        assert after >= size(model) * 0.9 and peak <= after + max(root, largest) * 1.1 + 2**20
        import bitsandbytes as bnb
        states = [m.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert states and all(s.absmax.is_cuda and s.code.is_cuda and s.state2.absmax.is_cuda for s in states)
        mine = two_steps(wrapped, wrapped.parameters())
    finally:
        dist.destroy_process_group()
    print("losses, GPU-loaded vs CPU-loaded under FSDP:", ref, mine)
    assert abs(mine[0] - ref[0]) < 2e-3 * abs(ref[0])
    assert abs(mine[1] - ref[1]) < 0.1 * abs(ref[1] - ref[0])  # the same update: the second loss moved alike


def test_fsdp_launch_with_speedups_on_one_gpu(small_llama, tmp_path, free_port):
    """finetune.py under `accelerate launch` with configs/accelerate_fsdp_qlora.yaml (one process: a world of one
    on this GPU) with its speed-ups: the fused RMSNorm / SwiGLU modules compiled inside FSDP's flattened units,
    the input and output layers in units of their own, the loss computed in the output layer's unit. It trains
    as `python finetune.py` (the fused decoder layers) does: the same losses within bf16 noise, no compile
    fallback and no recompilation past the limit. benchmarks/multi_gpu.py measures 2 GPUs."""
    model_dir, facts = small_llama
    data = tmp_path / "data.json"
    data.write_text(json.dumps(json.loads(facts.read_text()) * 8))
    common = ["--base_model", str(model_dir), "--data_path", str(data), "--max_steps", "6", "--learning_rate", "1e-3",
              "--per_device_train_batch_size", "4", "--lora_dropout", "0", "--logging_steps", "1",
              "--save_steps", "100", "--warmup_ratio", "0", "--report_to", "none"]
    single = run("finetune.py", *common, "--output_dir", str(tmp_path / "single"))
    assert "speed-ups: fused LoRA forward" in single
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "configs", "accelerate_fsdp_qlora.yaml"), "--num_processes", "1",
           "--main_process_port", str(free_port()), os.path.join(ROOT, "finetune.py"), *common,
           "--output_dir", str(tmp_path / "fsdp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env=dict(os.environ, TORCH_LOGS="recompiles"))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    print("\n".join(line for line in log.splitlines() if "speed-ups" in line or line.startswith("FSDP:")))
    assert "speed-ups under FSDP: fused RMSNorm x9 and SwiGLU x4 (compiled)" in log
    assert "the input and output layers in FSDP units of their own" in log
    # 4 layers, 56 LoRA matrices, the two ends, the root
    assert "FSDP: 63 units; embed_tokens in its own unit, lm_head in its own unit" in log
    assert "torch.compile of" not in log and "cache_size_limit" not in log and "recompile_limit" not in log
    ours = [loss for _, loss in json.loads((tmp_path / "fsdp" / "training_summary.json").read_text())["loss_history"]]
    ref = [loss for _, loss in json.loads((tmp_path / "single" / "training_summary.json").read_text())["loss_history"]]
    print("losses, one GPU (fused layers) vs FSDP (world of one):", ref, ours)
    assert len(ours) == len(ref) == 6
    assert ours == pytest.approx(ref, rel=2e-2)
    assert ours[-1] < ours[0]

"""FSDP-QLoRA through `accelerate launch` with configs/accelerate_fsdp_qlora.yaml, on the CPU: 2 processes over
gloo, the tiny 4-bit LLaMA sharded by FSDP1 (tests/fsdp_on_cpu.py says why a launcher is needed on the CPU).
Every checkpoint holds the whole adapter, the final one equals a single process's with the same global batch,
and a resume from a periodic checkpoint continues exactly."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

pytest.importorskip("accelerate")

from utils.checkpoints import checkpoint_problem  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVE = 4, 2


def cpu_config(tmp_path, port):
    """The repo's FSDP config on the CPU. cpu_ram_efficient_loading (and the sync_module_states it forces) is
    off: accelerate looks for a GPU to broadcast from when the FSDP plugin starts."""
    with open(os.path.join(ROOT, "configs", "accelerate_fsdp_qlora.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    config["use_cpu"], config["num_processes"], config["main_process_port"] = True, 2, port
    config["fsdp_config"].update(fsdp_cpu_ram_efficient_loading=False, fsdp_sync_module_states=False)
    path = tmp_path / "fsdp_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return log


def eight_records(tmp_path):
    """The sample dataset's first 8 records: with a global batch of 8, every step sees each of them."""
    records = json.loads(open(os.path.join(ROOT, "dataset", "sample.json"), encoding="utf-8").read())[:8]
    data = tmp_path / "eight.json"
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return data


def adapter(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def adapter_config(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    return dict(config, target_modules=sorted(config["target_modules"]))  # a set, saved in any order


def test_fsdp_checkpoints_hold_the_adapter_match_one_process_and_resume(tiny_llama_dir, tmp_path, free_port):
    data = eight_records(tmp_path)
    # 8 records, a global batch of 8: every step sees every record in both layouts; no dropout; the plain peft
    # path in the single process too (FSDP turns the fused speed-ups off)
    common = ["--base_model", tiny_llama_dir, "--data_path", str(data), "--max_steps", str(STEPS),
              "--save_steps", str(SAVE), "--cutoff_len", "128", "--lora_dropout", "0", "--learning_rate", "5e-3",
              "--warmup_ratio", "0", "--logging_steps", "1", "--report_to", "none", "--no-speedups",
              "--per_device_train_batch_size", "4"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", cpu_config(tmp_path, free_port()),
              os.path.join(ROOT, "tests", "fsdp_on_cpu.py"), *common, "--gradient_accumulation_steps", "1"]

    one = tmp_path / "one"
    run([sys.executable, os.path.join(ROOT, "finetune.py"), *common, "--output_dir", str(one),
         "--gradient_accumulation_steps", "2"])
    out = tmp_path / "fsdp"
    log = run([*launch, "--output_dir", str(out)])
    assert log.count("4-bit on FSDP-sharded over 2 processes") == 1
    # the new save path wrote every checkpoint (the Trainer's own wrote adapters with no tensors)
    reference = adapter(one / "checkpoint-final")
    assert len(reference) == 28  # 2 layers x 7 linear modules x (A, B)
    for name in (f"checkpoint-{SAVE}", f"checkpoint-{STEPS}", "checkpoint-final.tmp"):
        assert f"FSDP: adapter gathered from 2 processes ({len(reference)} tensors) into {out / name}" in log
    for name in (f"checkpoint-{SAVE}", f"checkpoint-{STEPS}", "checkpoint-final"):
        saved = adapter(out / name)
        assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference.items()}, name
        assert all(v.abs().sum() > 0 for v in saved.values()), name
        assert adapter_config(out / name) == adapter_config(one / "checkpoint-final")
    assert checkpoint_problem(str(out / f"checkpoint-{SAVE}")) is None
    assert not list(out.glob("checkpoint-*/pytorch_model_fsdp*"))

    # same updates as one process with the same global batch (the B matrices start at zero, so equal B's mean
    # equal training); the gap is float32 summation order, grown by Adam: measured 3e-6, allowed 2e-5
    final = adapter(out / "checkpoint-final")
    gap = max((final[k] - reference[k]).abs().max().item() for k in reference)
    print(f"largest |FSDP - one process| over the adapter: {gap:.2e}")
    assert gap < 2e-5
    assert min(reference[k].abs().max().item() for k in reference if "lora_B" in k) > 1e-3  # B moved from 0
    one_losses = json.loads((one / "training_summary.json").read_text())["loss_history"]
    fsdp_losses = json.loads((out / "training_summary.json").read_text())["loss_history"]
    assert [loss for _, loss in fsdp_losses] == pytest.approx([loss for _, loss in one_losses], rel=1e-4)

    # resume the FSDP run from its periodic checkpoint: the adapter and the optimizer come back, so it ends
    # where the uninterrupted run ended
    resumed = tmp_path / "resumed"
    log = run([*launch, "--output_dir", str(resumed), "--resume_from_checkpoint", str(out / f"checkpoint-{SAVE}")])
    assert f"FSDP: adapter loaded from {out / f'checkpoint-{SAVE}'} ({len(reference)} tensors)" in log
    again = adapter(resumed / "checkpoint-final")
    gap = max((again[k] - final[k]).abs().max().item() for k in final)
    print(f"largest |resumed - uninterrupted| over the adapter: {gap:.2e}")
    assert gap < 1e-6

    # and it loads as a normal peft adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = PeftModel.from_pretrained(base, str(out / "checkpoint-final"))
    loaded = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.equal(loaded, final["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])


def test_fsdp_with_speedups_trains_like_one_process(tiny_llama_dir, tmp_path, free_port):
    """The speed-ups that apply under FSDP (packed micro-batches, the fused norm and SwiGLU modules inside the
    flattened units, the chunked loss computed in the output layer's own unit and tied to the outputs so FSDP's
    backward completes) give one process's training with its full speed-ups at the same global batch."""
    data = eight_records(tmp_path)
    common = ["--base_model", tiny_llama_dir, "--data_path", str(data), "--max_steps", "3", "--save_steps", "100",
              "--cutoff_len", "128", "--lora_dropout", "0", "--learning_rate", "5e-3", "--warmup_ratio", "0",
              "--logging_steps", "1", "--report_to", "none", "--per_device_train_batch_size", "4"]

    one = tmp_path / "one"
    log = run([sys.executable, os.path.join(ROOT, "finetune.py"), *common, "--output_dir", str(one),
               "--gradient_accumulation_steps", "2"])
    assert "speed-ups: fused LoRA forward" in log
    out = tmp_path / "fsdp"
    log = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", cpu_config(tmp_path, free_port()),
               os.path.join(ROOT, "tests", "fsdp_on_cpu.py"), *common, "--output_dir", str(out),
               "--gradient_accumulation_steps", "1"])
    assert log.count("speed-ups under FSDP: fused RMSNorm x5 and SwiGLU x2 (eager (no CUDA compile here)), "
                     "chunked cross entropy on labelled positions, packed micro-batches") == 1
    # the input and output layers are units of their own (not held whole in the root unit all step long), and
    # the loss is computed inside the output layer's unit; the adapter below shows it trains as one process does
    assert "the input and output layers in FSDP units of their own" in log
    units = next(line for line in log.splitlines() if line.startswith("FSDP: ") and " units; " in line)
    print(units)
    assert units.endswith("embed_tokens in its own unit, lm_head in its own unit")
    final, reference = adapter(out / "checkpoint-final"), adapter(one / "checkpoint-final")
    assert len(final) == len(reference) == 28
    gap = max((final[k] - reference[k]).abs().max().item() for k in reference)
    print(f"largest |FSDP with speed-ups - one process with speed-ups| over the adapter: {gap:.2e}")
    assert gap < 2e-5
    one_losses = json.loads((one / "training_summary.json").read_text())["loss_history"]
    fsdp_losses = json.loads((out / "training_summary.json").read_text())["loss_history"]
    assert len(fsdp_losses) == 3
    assert [loss for _, loss in fsdp_losses] == pytest.approx([loss for _, loss in one_losses], rel=1e-4)


def test_own_units_for_the_input_and_output_layers_and_the_adapter_gathers_them(tmp_path, monkeypatch):
    """In one process (gloo, world of 1, real FSDP1 on the CPU): with the speed-ups' wrap classes, peft's policy
    gives the input embedding and the output layer units of their own, and where peft saves them (a resized
    vocabulary) the adapter gathered for a checkpoint holds them, with their values."""
    import torch.distributed as dist
    from peft import get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers import LlamaConfig, LlamaForCausalLM

    from utils import fsdp, speed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        model = get_peft_model(speed.prepare_model(base), speed.lora_config(
            16, fused=False, r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
        assert speed.ends_as_fsdp_units(model)
        monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", ",".join(speed.fsdp_wrap_classes(model, {})))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        root = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=torch.device("cpu"))
        # 2 layers + 28 LoRA matrices + the two ends + the root
        assert fsdp.describe_units(root) == "FSDP: 33 units; embed_tokens in its own unit, lm_head in its own unit"
        monkeypatch.setattr(fsdp, "_vocab_resized", lambda peft_model: True)
        tensors = fsdp.gather_adapter(root, model)
        ends = ["base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"]
        assert len(tensors) == 30 and all(name in tensors for name in ends)
        for name, tensor in tensors.items():
            assert torch.equal(tensor, before[name]), name
    finally:
        dist.destroy_process_group()

"""Nothing executes from a file by default: pickle weights (pytorch_model.bin, adapter_model.bin) are refused
with one line that names the flag, and load only with --allow_pickle."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from utils.args import UserError
from utils.modeling import load_model, resolve_adapter_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pickle_model(tiny_llama_dir, tmp_path_factory):
    """The tiny model saved as pytorch_model.bin (a pickle) and a LoRA adapter saved as adapter_model.bin."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    root = tmp_path_factory.mktemp("pickle")
    model_dir = root / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    torch.save(weights, model_dir / "pytorch_model.bin")
    model, _, _ = load_model(tiny_llama_dir, bits=16)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    adapter_dir = root / "adapter"
    peft_model.save_pretrained(adapter_dir)
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    (adapter_dir / "adapter_model.safetensors").unlink()
    torch.save(state, adapter_dir / "adapter_model.bin")
    return model_dir, adapter_dir, peft_model


def test_pickle_model_weights_are_refused_unless_allowed(pickle_model, tiny_llama_dir):
    model_dir, _, _ = pickle_model
    with pytest.raises(UserError, match="--allow_pickle") as e:
        load_model(str(model_dir), bits=16)
    assert "\n" not in str(e.value)
    model, _, _ = load_model(str(model_dir), bits=16, allow_pickle=True)
    reference, _, _ = load_model(tiny_llama_dir, bits=16)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_pickle_adapter_is_refused_unless_allowed(pickle_model, tiny_llama_dir):
    _, adapter_dir, peft_model = pickle_model
    with pytest.raises(UserError, match="adapter_model.bin.*--allow_pickle"):
        resolve_adapter_dir(str(adapter_dir))
    assert resolve_adapter_dir(str(adapter_dir), allow_pickle=True) == str(adapter_dir)
    model, _, _ = load_model(tiny_llama_dir, bits=16, lora_model=str(adapter_dir), allow_pickle=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, peft_model(ids).logits)


def test_cli_refuses_a_pickle_model_in_one_line(pickle_model):
    model_dir, adapter_dir, _ = pickle_model
    for flags in (["--model_path", str(model_dir)], ["--lora_model", str(adapter_dir), "--model_path",
                                                    str(model_dir)]):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "cli_demo.py"), *flags, "--num_gpus", "0"],
                              input="hi\n", capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "--allow_pickle" in error[0] and "Traceback" not in proc.stderr

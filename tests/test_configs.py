"""The shipped launcher configs load as accelerate reads them, and finetune.py's sharded mode is detected
from the variables `accelerate launch` sets for them."""

import json
import os

import pytest

from utils.modeling import quantization_config, sharded_engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name, kind", [("accelerate_ddp.yaml", "MULTI_GPU"), ("accelerate_fsdp_qlora.yaml", "FSDP"),
                                        ("accelerate_deepspeed_zero3.yaml", "DEEPSPEED")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig
    config = ClusterConfig.from_yaml_file(os.path.join(ROOT, "configs", name))
    assert str(config.distributed_type).endswith(kind) and config.num_processes == 2
    assert config.mixed_precision in (None, "no")  # finetune.py chooses bf16/fp16 itself
    if kind == "FSDP":
        fsdp = config.fsdp_config
        # a normal adapter file in every checkpoint, and the loading mode that needs synced module states
        assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT" and fsdp["fsdp_sync_module_states"] is True
    if kind == "DEEPSPEED":
        path = os.path.join(ROOT, config.deepspeed_config["deepspeed_config_file"])
        ds = json.load(open(path))
        assert ds["zero_optimization"]["stage"] == 3
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_sharded_mode_follows_the_launcher_variables(monkeypatch):
    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)
    assert sharded_engine() is None
    import torch
    assert quantization_config(4).bnb_4bit_quant_storage == torch.uint8  # packed bytes, the single-GPU default
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharded_engine() == "fsdp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert sharded_engine() == "deepspeed"
    from utils.modeling import compute_dtype
    # the storage dtype equals the other parameters' dtype (bf16 on GPUs; fp32 on this CPU)
    assert quantization_config(4, sharded=True).bnb_4bit_quant_storage == compute_dtype()

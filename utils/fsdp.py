"""The adapter of an FSDP-sharded model: gather it into a normal peft adapter folder, and load one back.

    accelerate launch --config_file configs/accelerate_fsdp_qlora.yaml finetune.py --base_model ... --data_path ...

Why not the Trainer's own save: under FSDP it takes the full state dict (clean keys such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`) and hands it to peft, and peft 0.21
picks the adapter's entries by the module names of the model it is given
(peft/tuners/tuners_utils.py: _get_tuner_state_dict_key_prefixes). Those names carry FSDP's
`_fsdp_wrapped_module.` in the middle (`...layers.0._fsdp_wrapped_module.self_attn.q_proj`: one unit per decoder
layer and per LoRA matrix), and peft strips it only at the start, so no key matches and adapter_model.safetensors
is written with no tensors (seen on 2 H100s). The Trainer's resume and best-model loading go through the same
peft code, or look for weights files an adapter checkpoint does not have.

Here every process takes part in gathering only the FSDP units that hold trainable parameters (the LoRA
matrices: megabytes, never the 4-bit base), process 0 writes the folder peft would, and resume copies it back
into every process's shards. All functions are collective: every process must call them, in the same order.
"""

import copy
import json
import os

import torch

WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")  # FSDP units, activation checkpointing
EMBEDDINGS = ("embed_tokens", "lm_head")  # peft saves these too when the vocabulary was resized


def _clean(name):
    for wrapper in WRAPPERS:
        name = name.replace(wrapper, "")
    return name


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _own_params(unit):
    """(name relative to the unit, parameter) of what `unit` shards itself, not its nested units."""
    return [(n, p) for n, p in unit.module.named_parameters() if not any(w in n for w in WRAPPERS)]


def _units(model, embeddings=False):
    """(clean module path, FSDP unit) of every unit holding trainable parameters (and, with `embeddings`, of
    the units holding the embedding layers: the root's, or their own), in module order: the same on every
    process."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    units = [(name, module) for name, module in model.named_modules() if isinstance(module, FSDP)]
    wanted = {name for name, unit in units if any(p.requires_grad for _, p in _own_params(unit))}
    if embeddings:
        for name, _ in model.named_modules():
            if name.rsplit(".", 1)[-1] in EMBEDDINGS:
                wanted.add(_owner([u for u, _ in units], name))
    return [(_clean(name), unit) for name, unit in units if name in wanted]


def _owner(unit_names, name):
    """The FSDP unit (its module path; "" is the root) whose parameters include those of module `name`: the
    module itself if it is a unit, else the innermost unit enclosing it."""
    return max((u for u in unit_names if not u or u == name or name.startswith(u + ".")), key=len)


def describe_units(model):
    """One line on how FSDP split `model` (the root): the number of units, and which unit holds the input
    embedding and the output layer (its own, or the root)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    units = [name for name, module in model.named_modules() if isinstance(module, FSDP)]
    parts = []
    for end in EMBEDDINGS:
        name = next((n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == end), None)
        if name is not None:
            owner = _owner(units, name)
            parts.append(f"{end} in its own unit" if owner == name else f"{end} in the root unit" if not owner
                         else f"{end} in the unit {_clean(owner)}")
    return f"FSDP: {len(units)} units; " + ", ".join(parts)


def _wanted(name, param, embeddings):
    return param.requires_grad or (embeddings and any(part in EMBEDDINGS for part in name.split(".")))


def _file_key(name, adapter):
    """peft's key in adapter_model.safetensors: the model's parameter name without the adapter name."""
    return ".".join(part for part in name.split(".") if part != adapter)


def _vocab_resized(peft_model):
    """peft's rule for saving the embedding layers too: the vocabulary differs from the base model's."""
    base = peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path
    path = os.path.join(base or "", "config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        vocab = json.load(f).get("vocab_size")
    return vocab is not None and vocab != peft_model.config.vocab_size


def gather_adapter(model, peft_model):
    """{parameter name: CPU tensor} of the adapter on process 0, {} on the others. `model` is the FSDP root,
    `peft_model` the PeftModel inside it."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    main = dist.get_rank() == 0
    embeddings = _vocab_resized(peft_model)
    tensors = {}
    for path, unit in _units(model, embeddings):
        # each unit alone, so at most one LoRA matrix (or the root's embeddings) is whole at a time; nothing is
        # offloaded by FSDP (its CPU offload frees the parameters' storage when they already live on the CPU)
        with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True):
            if main:
                for name, param in _own_params(unit):
                    if _wanted(_join(path, name), param, embeddings):
                        tensors[_join(path, name)] = param.detach().to("cpu", copy=True)
    return tensors


def save_adapter(model, peft_model, folder, is_main):
    """Write `folder`/adapter_model.safetensors and adapter_config.json as peft's save_pretrained does;
    returns the number of tensors written (0 on the other processes)."""
    from safetensors.torch import save_file
    tensors = gather_adapter(model, peft_model)
    if not is_main:
        return 0
    adapter = peft_model.active_adapter
    os.makedirs(folder, exist_ok=True)
    save_file({_file_key(k, adapter): v.contiguous() for k, v in tensors.items()},
              os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(peft_model.peft_config[adapter])
    config.inference_mode = True  # as peft saves it
    config.save_pretrained(folder)
    return len(tensors)


def load_adapter(model, peft_model, folder):
    """Copy `folder`/adapter_model.safetensors into every process's shards (resume, best checkpoint)."""
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
    adapter = peft_model.active_adapter
    embeddings = any(part in EMBEDDINGS for key in saved for part in key.split("."))
    # the root unit first: unsharding an inner unit before the first forward would make it the root
    with FSDP.summon_full_params(model, recurse=False, writeback=False, rank0_only=True):
        pass
    used = set()
    for path, unit in _units(model, embeddings):
        with FSDP.summon_full_params(unit, recurse=False, writeback=True), torch.no_grad():
            for name, param in _own_params(unit):
                key = _file_key(_join(path, name), adapter)
                if _wanted(_join(path, name), param, embeddings) and key in saved:
                    param.copy_(saved[key])
                    used.add(key)
                elif param.requires_grad:
                    raise RuntimeError(f"{folder}: the adapter lacks {key}")
    if set(saved) - used:
        raise RuntimeError(f"{folder}: tensors the model has no place for: {sorted(set(saved) - used)[:5]}")
    return len(used)

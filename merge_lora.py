"""Merge a trained LoRA adapter into its base model and save a standalone model (safetensors).

    python merge_lora.py --lora_model output/checkpoint-final --output_dir models/
    python merge_lora.py --lora_model output/checkpoint-200 --output_dir models/ --model_name my-model

The base model, prompt template and bits are read from the adapter's training_meta.json. An adapter trained
on a 4-bit base is merged into the NF4-dequantized base weights (the weights it was trained against), which
reproduces the adapter model's outputs; --no-nf4_base merges into the original weights instead.
"""

import argparse
import os
import shutil
import tempfile

from utils.args import UserError, add_bool, add_model_args, run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = add_model_args(p, inference=True)
    g.set_defaults(num_gpus=0)
    g = p.add_argument_group("Merge")
    g.add_argument("--output_dir", default="models", help="parent folder of the merged model")
    g.add_argument("--model_name", default=None,
                   help="merged model folder name under --output_dir (default: <base name>-merged)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of the saved weights; auto = the base model's own dtype")
    add_bool(g, "--nf4_base", True, "for adapters trained in 4-bit, merge into the NF4-dequantized base")
    add_bool(g, "--overwrite", False, "replace an existing, non-empty merged model folder")
    return p.parse_args(argv)


def main(args):
    import torch
    from peft import PeftModel

    from utils.modeling import (
        load_model,
        load_tokenizer,
        read_meta,
        resolve_adapter_dir,
        resolve_model_path,
        write_meta,
    )

    # ---- resolve: adapter, its record, the base and where the result goes ----
    if not args.lora_model:
        raise UserError("--lora_model is required (e.g. output/checkpoint-final)")
    adapter_dir = resolve_adapter_dir(args.lora_model, args.allow_pickle)
    meta = read_meta(adapter_dir)
    base_spec = args.model_path or meta.get("base_model")
    if not base_spec:
        raise UserError(f"{adapter_dir} records no base model (no training_meta.json): pass --base_model")
    name = args.model_name or os.path.basename(os.path.normpath(base_spec)).removesuffix(".gguf") + "-merged"
    out = os.path.join(args.output_dir, name)
    base_path = resolve_model_path(base_spec, args.local_files_only)
    if os.path.isdir(base_path) and os.path.realpath(out) == os.path.realpath(base_path):
        raise UserError(f"refusing to write the merged model into the base model's own folder {base_path}")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        raise UserError(f"{out} already exists and is not empty; pass --overwrite or choose --model_name")
    trained_bits = meta.get("bits", 16)
    nf4 = args.nf4_base and trained_bits == 4
    print(f"merging {adapter_dir} into {base_spec} ({'NF4-dequantized' if nf4 else 'original'} weights) -> {out}")

    # ---- load the base unquantized (and, for a 4-bit adapter, with the weights it was trained against) ----
    common = dict(num_gpus=args.num_gpus, max_gpu_memory=args.max_gpu_memory,
                  local_files_only=args.local_files_only, trust_remote_code=args.trust_remote_code,
                  allow_pickle=args.allow_pickle)
    model, _, _ = load_model(base_spec, bits=16, **common)
    if nf4:
        changed = load_nf4_weights(model, load_model(base_spec, bits=4, **common)[0])
        print(f"replaced {changed} linear weights by their NF4 round trip")

    # ---- merge ----
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload(progressbar=True)
    tokenizer = load_tokenizer(adapter_dir, padding_side="left")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else _config_dtype(base_path, args.local_files_only)
    model = model.to(dtype)
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id

    # ---- save: into a temporary folder, renamed when complete ----
    os.makedirs(args.output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=args.output_dir)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the merged model is meant to be shared
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_meta(tmp, dict(meta, merged_from=os.path.abspath(adapter_dir),
                             merged_into="nf4-dequantized" if nf4 else "original", bits=16,
                             base_model=base_spec))
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"saved {out} ({dtype}); chat with: python cli_demo.py --model_path {out}")
    return out


def load_nf4_weights(model, quantized):
    """Copy the dequantized NF4 weights of `quantized` (a 4-bit copy of the same base) into `model`.
    `quantized` must not have run a forward pass: bitsandbytes' CPU path repacks the weights on first use."""
    import bitsandbytes as bnb
    import torch
    own = dict(model.named_modules())
    changed = 0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                target = own[name].weight
                target.copy_(w.to(device=target.device, dtype=target.dtype))
                changed += 1
    del quantized
    return changed


def _config_dtype(base_path, local_files_only):
    """The dtype the base model was published in (float32 for the bundled model, usually bf16/fp16)."""
    import torch
    from transformers import AutoConfig
    dtype = getattr(AutoConfig.from_pretrained(base_path, local_files_only=local_files_only), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


if __name__ == "__main__":
    run_main(main, parse_args)

"""Perplexity of a model, or a base model + adapter, on an instruction dataset: compare before and after.

    python perplexity.py --data_path dataset/sample.json                        # the bundled base model
    python perplexity.py --lora_model output/checkpoint-final --data_path dataset/sample.json
    python perplexity.py --model_path models/smollm2-135m-merged --data_path my_eval.jsonl --json ppl.json

Only the answer tokens count (the tokens training learns from), rendered with the same template and cutoff
as training: the adapter's recorded ones, unless --prompt_template / --cutoff_len say otherwise.
"""

import argparse
import json
import os

from utils.args import BUNDLED_MODEL, UserError, add_model_args, resolve_bits, run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, inference=True)
    g = p.add_argument_group("Data")
    g.add_argument("--data_path", required=True, nargs="+",
                   help="one or more data files (JSON, JSONL, parquet, a save_to_disk folder), as finetune.py takes")
    g.add_argument("--data_format", default="auto", choices=("auto", "alpaca", "sharegpt", "messages"),
                   help="record format; auto = detected per file")
    g.add_argument("--prompt_template", default=None,
                   help="template name or .json path (default: the adapter's recorded one, else auto)")
    g.add_argument("--cutoff_len", type=int, default=None,
                   help="longest example in tokens (default: the adapter's recorded one, else 512)")
    g.add_argument("--batch_size", type=int, default=4, help="examples per forward pass")
    g.add_argument("--max_records", type=int, default=0, help="evaluate only the first N records (0 = all)")
    g.add_argument("--json", default=None, help="also write the result to this JSON file")
    return p.parse_args(argv)


def main(args):
    from utils import data as D
    from utils.modeling import read_meta, resolve_adapter_dir

    if args.batch_size < 1 or (args.cutoff_len is not None and args.cutoff_len < 1) or args.max_records < 0:
        raise UserError("--batch_size and --cutoff_len must be >= 1, --max_records >= 0")
    # ---- data first: a bad file fails before any model loads ----
    records, _ = D.load_dataset(args.data_path, args.data_format)
    if args.max_records:
        records = records[:args.max_records]
    adapter_dir = resolve_adapter_dir(args.lora_model, args.allow_pickle) if args.lora_model else None
    meta = read_meta(adapter_dir) if adapter_dir else {}

    # ---- model: the recorded base and bits unless flags say otherwise ----
    from tqdm.auto import tqdm

    from utils.evaluation import perplexity
    from utils.modeling import load_model
    from utils.prompts import load_template
    model_spec = args.model_path or meta.get("base_model") or BUNDLED_MODEL
    bits = resolve_bits(args, default=meta.get("bits", 16))
    model, tokenizer, info = load_model(model_spec, bits=bits, lora_model=adapter_dir, num_gpus=args.num_gpus,
                                        max_gpu_memory=args.max_gpu_memory, local_files_only=args.local_files_only,
                                        trust_remote_code=args.trust_remote_code, tokenizer_path=adapter_dir,
                                        allow_pickle=args.allow_pickle)
    template = load_template(args.prompt_template or meta.get("prompt_template") or "auto", tokenizer)
    cutoff = args.cutoff_len or meta.get("cutoff_len") or 512
    examples = D.tokenize_records(records, tokenizer, template, cutoff, train_on_inputs=False)

    # ---- evaluate ----
    result = perplexity(model, examples, tokenizer.pad_token_id, args.batch_size,
                        progress=lambda batches: tqdm(batches, desc="perplexity", unit="batch"))
    result.update(model=model_spec, lora_model=adapter_dir, bits=bits, template=template.name, cutoff_len=cutoff,
                  data_path=[os.path.abspath(p) for p in args.data_path])
    print(f"{model_spec}{' + ' + adapter_dir if adapter_dir else ''} ({bits}-bit on {info['where']}): "
          f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f} over {result['tokens']} answer "
          f"tokens in {result['examples']} examples")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    run_main(main, parse_args)

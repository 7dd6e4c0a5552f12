"""Command-line pieces shared by the four scripts, so every flag is spelled the same everywhere.

Booleans accept `--flag`, `--no-flag` and `--flag=True/False` (the original README writes
`--load_8bit=False`); `type=bool` is never used because `bool("False")` is True.
"""

import argparse
import sys
import warnings

BUNDLED_MODEL = "smollm2-135m"
# finetune.py's --data_format and --overlong choices (the record formats of utils/data.py's FORMAT_FIELDS; its
# overlong policies), here in a light module so that `finetune.py --help` does not import torch
FORMATS = ("alpaca", "sharegpt", "messages")
OVERLONG = ("truncate", "drop")


class UserError(Exception):
    """A mistake in the user's flags, paths or data: printed as one line, exit code 2, no traceback."""


def str2bool(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def add_bool(group, name, default, help):
    """`--name`, `--name=False` and `--no-name` all work; `dest` is the name with dashes as underscores."""
    dest = name.lstrip("-").replace("-", "_")
    group.add_argument(name, dest=dest, type=str2bool, nargs="?", const=True, default=default,
                       metavar="BOOL", help=f"{help} (default: {default})")
    group.add_argument("--no-" + name.lstrip("-"), dest=dest, action="store_false", help=argparse.SUPPRESS)


def add_model_args(parser, *, inference):
    """Flags that say which model to load and how; shared by finetune, merge, CLI and web UI."""
    g = parser.add_argument_group("Model")
    if inference:
        g.add_argument("--model_path", "--base_model", dest="model_path", default=None,
                       help="model to chat with: a merged model folder, a local HF folder, a .gguf file, a hub id "
                            "(with --no-local_files_only), or the bundled model's short name "
                            f"'{BUNDLED_MODEL}'. Default: the base model recorded in --lora_model, else "
                            f"'{BUNDLED_MODEL}'")
        g.add_argument("--lora_model", default=None,
                       help="adapter folder (output/checkpoint-final, any checkpoint-N) to apply on top of "
                            "--model_path without merging")
    else:
        g.add_argument("--base_model", default=BUNDLED_MODEL,
                       help="base model: a local HF folder, a .gguf file of a LLaMA-family model, a hub id "
                            f"(with --no-local_files_only), or the bundled '{BUNDLED_MODEL}' (default)")
    g.add_argument("--bits", type=int, choices=(4, 8, 16), default=None,
                   help="weight precision: 4 = NF4 + double quantization (QLoRA), 8 = LLM.int8, "
                        "16 = bf16 on GPUs that have it, else fp32. Default: 4 for training; for chat, the "
                        "adapter's training bits, else 16")
    add_bool(g, "--use_8bit", False, "legacy spelling of --bits 8")
    if inference:
        # the original chat scripts spell it --load_8bit
        g.add_argument("--load_8bit", dest="use_8bit", type=str2bool, nargs="?", const=True,
                       metavar="BOOL", help="legacy spelling of --bits 8 (default: False)")
        g.add_argument("--no-load_8bit", dest="use_8bit", action="store_false", help=argparse.SUPPRESS)
    add_bool(g, "--local_files_only", True,
             "never contact a model hub; pass --no-local_files_only to let transformers download a hub id")
    add_bool(g, "--trust_remote_code", False, "run Python code shipped inside the model folder")
    add_bool(g, "--allow_pickle", False,
             "also load pickle weights (pytorch_model.bin, adapter_model.bin), which can run code when loaded; "
             "only for files you trust")
    g.add_argument("--num_gpus", type=int, default=None,
                   help="0 = CPU; N = spread the model over the first N GPUs (clamped to what exists). "
                        "Default: all visible GPUs for chat; ignored under torchrun/accelerate")
    g.add_argument("--max_gpu_memory", default=None,
                   help="per-GPU memory cap when spreading over several GPUs, e.g. '20GiB' (default: 90%% of each)")
    return g


def add_generation_args(parser):
    g = parser.add_argument_group("Generation")
    g.add_argument("--max_new_tokens", type=int, default=512, help="most tokens generated per reply")
    g.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature; 0 = greedy decoding (deterministic)")
    g.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling probability mass, in (0, 1]")
    g.add_argument("--top_k", type=int, default=40, help="sample from the k most likely tokens; 0 = no limit")
    g.add_argument("--repetition_penalty", type=float, default=1.1, help="1.0 = off; >1 discourages repeats")
    g.add_argument("--input_pattern", "--prompt_template", dest="input_pattern", default=None,
                   help="prompt template name or .json path; default: the one recorded in the adapter/model, "
                        "else the tokenizer's chat template, else 'alpaca'")
    g.add_argument("--max_history_tokens", type=int, default=None,
                   help="oldest turns are dropped so the prompt fits this many tokens "
                        "(default: context length minus --max_new_tokens)")
    g.add_argument("--max_input_tokens", type=int, default=None,
                   help="longest message accepted, in tokens; a longer one is refused with a message to its "
                        "sender (default: the prompt budget, i.e. --max_history_tokens or context length minus "
                        "--max_new_tokens)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: not fixed)")
    g.add_argument("--system", default=None, help="system text for the conversation (default: the template's)")
    return g


def resolve_bits(args, default):
    """Fold the legacy 8-bit spellings into --bits, refusing contradictions."""
    if args.use_8bit:
        if args.bits not in (None, 8):
            raise UserError(f"--use_8bit/--load_8bit contradicts --bits {args.bits}; pass only one of them")
        return 8
    return args.bits if args.bits is not None else default


def check_generation_args(args):
    problems = []
    if args.max_new_tokens < 1:
        problems.append(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        problems.append(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        problems.append(f"--top_k must be >= 0, got {args.top_k}")
    if args.repetition_penalty <= 0:
        problems.append(f"--repetition_penalty must be > 0, got {args.repetition_penalty}")
    for flag in ("max_history_tokens", "max_input_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            problems.append(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.num_gpus is not None and args.num_gpus < 0:
        problems.append(f"--num_gpus must be >= 0, got {args.num_gpus}")
    if problems:
        raise UserError("; ".join(problems))


def run_main(main, parse_args):
    """Entry point of every script: user mistakes become one line on stderr and exit code 2."""
    # deprecation notices that transformers raises about peft's own internal calls: nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6", category=FutureWarning)
    try:
        return main(parse_args())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)

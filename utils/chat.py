"""What cli_demo.py and gradio_ui.py share: resolving which model, adapter, bits and template to chat with
(explicit flags win over the adapter's recorded training setup, and the choice is printed), and turning a
history + query into a streamed reply."""

import os
from dataclasses import dataclass

from utils.args import BUNDLED_MODEL, UserError, check_generation_args, resolve_bits
from utils.generation import build_chat_prompt, context_length, stream_reply
from utils.modeling import load_model, read_meta, resolve_adapter_dir
from utils.prompts import load_template


@dataclass
class ChatModel:
    model: object
    tokenizer: object
    template: object
    max_prompt_tokens: int
    description: str

    def stream(self, history, query, settings, stop_event=None, system=None):
        """Yield text deltas of the reply to `query` after `history` ([(user, assistant), ...]).
        `settings` holds the generation settings (an argparse namespace or a dict, e.g. from web sliders).
        Raises ValueError when the query alone exceeds the prompt budget."""
        max_new = settings["max_new_tokens"] if isinstance(settings, dict) else settings.max_new_tokens
        ctx = context_length(self.model, self.tokenizer)
        budget = min(self.max_prompt_tokens, ctx - int(max_new))
        if budget < 1:
            raise ValueError(f"max_new_tokens {max_new} leaves no room for the prompt in the {ctx}-token context")
        ids, _ = build_chat_prompt(self.tokenizer, self.template, history, query, budget, system)
        yield from stream_reply(self.model, self.tokenizer, ids, settings, stop_event)


def load_chat_model(args, log=print):
    """Load the model described by the shared Model/Generation flags, ready to chat."""
    check_generation_args(args)
    adapter_dir = resolve_adapter_dir(args.lora_model) if args.lora_model else None
    meta = read_meta(adapter_dir) if adapter_dir else {}
    if not meta and args.model_path and os.path.isdir(args.model_path):
        meta = read_meta(args.model_path)  # a merged model carries its adapter's record
    model_spec = args.model_path or (meta.get("base_model") if adapter_dir else None) or BUNDLED_MODEL
    if adapter_dir and not args.model_path:
        log(f"base model: {model_spec} (recorded in {adapter_dir})")
    default_bits = meta.get("bits", 16) if adapter_dir else 16
    bits = resolve_bits(args, default=default_bits)
    if adapter_dir and bits != default_bits:
        log(f"note: the adapter was trained on a {default_bits}-bit base; loading it in {bits}-bit as asked")
    model, tokenizer, info = load_model(
        model_spec, bits=bits, lora_model=adapter_dir, num_gpus=args.num_gpus,
        max_gpu_memory=args.max_gpu_memory, local_files_only=args.local_files_only,
        trust_remote_code=args.trust_remote_code, tokenizer_path=adapter_dir)
    if args.input_pattern:
        template, source = load_template(args.input_pattern, tokenizer), "--input_pattern"
    elif meta.get("prompt_template"):
        template, source = load_template(meta["prompt_template"], tokenizer), "recorded at training"
    else:
        template, source = load_template("auto", tokenizer), "default"
    ctx = context_length(model, tokenizer)
    budget = args.max_history_tokens or ctx - args.max_new_tokens
    if budget < 16:
        raise UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room for the prompt in the "
                        f"model's {ctx}-token context")
    desc = (f"{model_spec}{' + ' + adapter_dir if adapter_dir else ''}, {bits}-bit on {info['where']}, "
            f"template '{template.name}' ({source})")
    log(f"model: {desc}")
    return ChatModel(model, tokenizer, template, budget, desc)

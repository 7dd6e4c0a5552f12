"""What cli_demo.py and gradio_ui.py share: resolving which model, adapter, bits and template to chat with
(explicit flags win over the adapter's recorded training setup, and the choice is printed), and turning a
history + query into a streamed reply."""

import os
from dataclasses import dataclass

import torch

from utils.args import BUNDLED_MODEL, UserError, check_generation_args, resolve_bits
from utils.generation import (
    PromptTooLong,
    ReplyOutOfMemory,
    build_chat_prompt,
    context_length,
    empty_turn_tokens,
    free_memory,
    longest_token_chars,
    plausible_turns,
    stream_reply,
)
from utils.modeling import load_model, read_meta, resolve_adapter_dir
from utils.prompts import load_template


@dataclass
class ChatModel:
    model: object
    tokenizer: object
    template: object
    max_prompt_tokens: int  # the prompt's budget (--max_history_tokens, default: context minus --max_new_tokens)
    max_input_tokens: int  # the longest message accepted (--max_input_tokens, at most the budget)
    description: str

    def __post_init__(self):  # bounds that let a history be cut before it is tokenized (plausible_turns)
        self.max_token_chars = longest_token_chars(self.tokenizer)
        # halved: a margin for tokenizers that merge a turn's text with the template's text around it
        self.min_turn_tokens = max(1, empty_turn_tokens(self.tokenizer, self.template) // 2)

    def recent_turns(self, history):
        """The newest turns of `history` that could still reach the model; older ones need not be kept."""
        return plausible_turns(history, self.max_prompt_tokens, self.max_token_chars, self.min_turn_tokens)

    def prompt_ids(self, history, query, max_new_tokens, system=None):
        """Token ids of the prompt for `query` after `history` ([(user, assistant), ...]): the one place where
        the CLI's and the web UI's input is limited. The message must fit --max_input_tokens; the oldest turns
        are dropped until prompt + `max_new_tokens` fits the context (and --max_history_tokens).
        Raises PromptTooLong with a message meant for the user."""
        ctx = context_length(self.model, self.tokenizer)
        budget = min(self.max_prompt_tokens, ctx - int(max_new_tokens))
        if budget < 1:
            raise PromptTooLong(f"max_new_tokens {max_new_tokens} leaves no room for the prompt in the "
                                f"{ctx}-token context")
        limit = min(self.max_input_tokens, budget)
        if len(query) > 2 * limit * self.max_token_chars:  # surely too long: refused without tokenizing it
            raise PromptTooLong(f"the message is {len(query)} characters long; the limit is {limit} tokens")
        n = len(self.tokenizer(query, add_special_tokens=False)["input_ids"])
        if n > limit:
            raise PromptTooLong(f"the message is {n} tokens long; the limit is {limit}")
        history = plausible_turns(history, budget, self.max_token_chars, self.min_turn_tokens)
        return build_chat_prompt(self.tokenizer, self.template, history, query, budget, system)[0]

    def stream(self, history, query, settings, stop_event=None, system=None):
        """Yield text deltas of the reply to `query` after `history` ([(user, assistant), ...]).
        `settings` holds the generation settings (an argparse namespace or a dict, e.g. from web sliders).
        Raises PromptTooLong (see `prompt_ids`) before generating anything, and ReplyOutOfMemory when the device
        runs out of memory (its memory is freed first, so the next reply can run)."""
        max_new = settings["max_new_tokens"] if isinstance(settings, dict) else settings.max_new_tokens
        ids = self.prompt_ids(history, query, max_new, system)
        out_of_memory = False
        try:
            yield from stream_reply(self.model, self.tokenizer, ids, settings, stop_event)
        except torch.OutOfMemoryError:  # also torch.cuda.OutOfMemoryError
            out_of_memory = True  # freed below, once this exception and the frames it holds are gone
        if out_of_memory:
            free_memory()
            raise ReplyOutOfMemory("out of memory while generating this reply; try a shorter message, a shorter "
                                   "conversation or fewer new tokens")


def load_chat_model(args, log=print):
    """Load the model described by the shared Model/Generation flags, ready to chat."""
    check_generation_args(args)
    adapter_dir = resolve_adapter_dir(args.lora_model, args.allow_pickle) if args.lora_model else None
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
        trust_remote_code=args.trust_remote_code, tokenizer_path=adapter_dir, allow_pickle=args.allow_pickle)
    if args.input_pattern:
        template, source = load_template(args.input_pattern, tokenizer), "--input_pattern"
    elif meta.get("prompt_template"):
        template, source = load_template(meta["prompt_template"], tokenizer), "recorded at training"
    else:
        template, source = load_template("auto", tokenizer), "default"
    ctx = context_length(model, tokenizer)
    budget = min(args.max_history_tokens or ctx, ctx - args.max_new_tokens)
    if budget < 16:
        flag, value = (("--max_history_tokens", args.max_history_tokens) if budget == args.max_history_tokens
                       else ("--max_new_tokens", args.max_new_tokens))
        raise UserError(f"{flag} {value} leaves under 16 tokens for the prompt in the model's {ctx}-token context")
    max_input = args.max_input_tokens or budget
    if max_input > budget:
        log(f"note: --max_input_tokens {max_input} is more than the {budget}-token prompt budget; using {budget}")
        max_input = budget
    desc = (f"{model_spec}{' + ' + adapter_dir if adapter_dir else ''}, {bits}-bit on {info['where']}, "
            f"template '{template.name}' ({source})")
    log(f"model: {desc}")
    return ChatModel(model, tokenizer, template, budget, max_input, desc)

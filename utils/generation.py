"""Streaming generation: one primitive, `stream_reply`, a generator of text deltas.

The blocking call (`generate_reply`) joins it, the CLI prints the deltas, the web UI accumulates them.
Closing the generator (a Stop button, a closed tab, Ctrl-C) sets a stop flag that is read after every token.
Where utils/decoder.py covers the model (LLaMA-shaped, on one device) the tokens come from its static-cache
decoder (CUDA graphs on a GPU); otherwise from transformers' `generate` in a worker thread.
"""

import contextlib
import queue
import sys
import threading

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from utils.decoder import fast_decoder
from utils.prompts import encode_conversation, history_to_messages

_DONE = object()


def generation_kwargs(settings, tokenizer, model):
    """Fresh keyword arguments for `model.generate` from a settings object/dict (never shared state)."""
    get = settings.get if isinstance(settings, dict) else (lambda k, d=None: getattr(settings, k, d))
    temperature = float(get("temperature", 0.0) or 0.0)
    kwargs = dict(max_new_tokens=int(get("max_new_tokens", 256)),
                  repetition_penalty=float(get("repetition_penalty", 1.0) or 1.0),
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(tokenizer, model))
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=float(get("top_p", 1.0)),
                      top_k=int(get("top_k", 0) or 0))
    else:  # greedy; unset the sampling knobs a model's generation_config may carry, or transformers warns
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def stop_token_ids(tokenizer, model):
    """EOS of the tokenizer plus any end-of-turn ids in the model's generation config."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    return sorted(i for i in ids if i is not None)


class _StopOnEvent(StoppingCriteria):
    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _TextDeltas:
    """Token ids in, complete-character text deltas out.

    The whole reply is re-decoded each step and only the new suffix is sent; a suffix ending in U+FFFD
    (a character whose bytes span several tokens, common in Chinese) is held back until complete.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def add(self, ids):
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.sent and not text.endswith("\ufffd"):
            delta, self.sent = text[self.sent:], len(text)
            return delta
        return None

    def finish(self):  # a character cut off by max_new_tokens is dropped, never shown as U+FFFD
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd")
        return text[self.sent:] if len(text) > self.sent else None


class _DeltaStreamer(BaseStreamer):
    """Receives token ids from `generate` (the prompt first, then one step at a time), queues text deltas."""

    def __init__(self, tokenizer, out_queue):
        self.deltas, self.queue, self.prompt_seen = _TextDeltas(tokenizer), out_queue, False

    def put(self, value):
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        delta = self.deltas.add(value.reshape(-1).tolist())
        if delta:
            self.queue.put(delta)

    def end(self):
        delta = self.deltas.finish()
        if delta:
            self.queue.put(delta)


def stream_reply(model, tokenizer, input_ids, settings, stop_event=None):
    """Yield the reply to `input_ids` (a list of token ids) as text deltas."""
    stop_event = stop_event or threading.Event()
    out = queue.Queue()
    kwargs = generation_kwargs(settings, tokenizer, model)
    seed = settings.get("seed") if isinstance(settings, dict) else getattr(settings, "seed", None)

    def work():
        try:
            if seed is not None:
                torch.manual_seed(seed)
            if not _decode_static(model, tokenizer, input_ids, kwargs, stop_event, out.put):
                device = model.get_input_embeddings().weight.device
                ids = torch.tensor([input_ids], dtype=torch.long, device=device)
                with torch.inference_mode():
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   streamer=_DeltaStreamer(tokenizer, out),
                                   stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop_event)]), **kwargs)
        except BaseException as e:  # handed to the consumer, which re-raises it in its own thread
            out.put(e)
        finally:
            out.put(_DONE)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    finished = False
    try:
        while (item := out.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
        finished = True
    finally:
        # Closed early (Stop, a closed tab, Ctrl-C): the flag ends the thread within one token. It is not
        # waited for, since the web server closes generators on its event loop and would stall every user.
        stop_event.set()
        if finished:
            thread.join()


def _decode_static(model, tokenizer, input_ids, kwargs, stop_event, emit):
    """Stream the reply through utils/decoder.py's StaticDecoder, handing text deltas to `emit`. Returns False,
    having emitted nothing, where it does not apply: not covered, busy with another reply, or failing on its
    first use for this model (then it says why once, and generate() takes over for good)."""
    engine = fast_decoder(model)
    if engine is None or not engine.try_acquire():
        return False
    try:
        deltas = _TextDeltas(tokenizer)
        with contextlib.closing(engine.generate(input_ids, kwargs, stop_event)) as tokens:
            for token_id in tokens:
                engine.proven = True
                delta = deltas.add([token_id])
                if delta:
                    emit(delta)
        delta = deltas.finish()
        if delta:
            emit(delta)
        return True
    except Exception as e:
        if engine.proven or isinstance(e, ValueError):
            raise
        model._static_decoder = f"it failed: {type(e).__name__}: {e}"
        print(f"note: fast decoding failed ({type(e).__name__}: {e}); using transformers' generate",
              file=sys.stderr, flush=True)
        return False
    finally:
        engine.release()


def generate_reply(model, tokenizer, input_ids, settings):
    return "".join(stream_reply(model, tokenizer, input_ids, settings))


def build_chat_prompt(tokenizer, template, history, query, max_prompt_tokens, system=None):
    """Token ids for `history` + `query`, dropping the oldest turns until it fits `max_prompt_tokens`.
    Returns (ids, turns_kept); raises ValueError if the query alone does not fit."""
    history = list(history)
    while True:
        ids, _ = encode_conversation(tokenizer, template, history_to_messages(history, query, system),
                                     add_generation_prompt=True)
        if len(ids) <= max_prompt_tokens:
            return ids, len(history)
        if not history:
            raise ValueError(f"the message is {len(ids)} tokens long; the limit is {max_prompt_tokens}")
        history.pop(0)


def context_length(model, tokenizer):
    n = getattr(model.config, "max_position_embeddings", None) or 2048
    tok_max = getattr(tokenizer, "model_max_length", None)
    return min(n, tok_max) if tok_max and tok_max < 10**9 else n

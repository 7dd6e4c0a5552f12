"""Streaming generation: one primitive, `stream_reply`, a generator of text deltas.

The blocking call (`generate_reply`) joins it, the CLI prints the deltas, the web UI accumulates them.
Closing the generator (a Stop button, a closed tab, Ctrl-C) sets a stop flag that is read after every token.
Where utils/decoder.py covers the model (LLaMA-shaped, on one device) the tokens come from its static-cache
decoder (CUDA graphs on a GPU); otherwise from transformers' `generate` in a worker thread.
"""

import contextlib
import gc
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


class PromptTooLong(ValueError):
    """The user's message does not fit its limit: a message for that user, never a crash."""


class ReplyOutOfMemory(RuntimeError):
    """The device ran out of memory during one reply; the memory it held is freed and the next reply can run."""


def free_memory():
    """Give back the memory of a failed reply: the tensors it held are reachable only from reference cycles
    (an exception's traceback holds the frames that held them) until collected, and CUDA keeps freed blocks
    cached for this process until emptied."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def longest_token_chars(tokenizer):
    """An upper bound on the characters one token stands for (byte-level and SentencePiece vocabularies
    spell each token with at least one character per character it covers)."""
    return max(map(len, tokenizer.get_vocab()))


def plausible_turns(history, max_prompt_tokens, max_token_chars, min_turn_tokens=1):
    """The newest turns of `history` ([(user, assistant), ...]) that might fit `max_prompt_tokens`, found
    without tokenizing: older turns go once their count (each costs at least `min_turn_tokens`; at least one,
    the EOS after its answer) or their characters (at most `max_token_chars` per token, doubled for normalizers
    that fold characters) cannot fit. This bounds the work a long or hostile history causes."""
    max_turns = max_prompt_tokens // max(1, min_turn_tokens)
    max_chars, chars, kept = 2 * max_prompt_tokens * max_token_chars, 0, 0
    for user, assistant in reversed(history[max(0, len(history) - max_turns):]):
        chars += len(user) + len(assistant)
        if chars > max_chars:
            break
        kept += 1
    return list(history[len(history) - kept:])


def empty_turn_tokens(tokenizer, template, system=None):
    """Tokens that one turn with an empty question and answer adds to a prompt: what the template puts around
    every turn."""

    def length(history):
        messages = history_to_messages(history, "", system)
        return len(encode_conversation(tokenizer, template, messages, add_generation_prompt=True)[0])

    return length([("", "")]) - length([])


def build_chat_prompt(tokenizer, template, history, query, max_prompt_tokens, system=None):
    """Token ids for `history` + `query` with as many of the newest turns as fit `max_prompt_tokens`.
    Returns (ids, turns_kept); raises PromptTooLong if the query alone does not fit.

    Encoding k turns costs more than k times one turn (a chat template re-renders the earlier turns), so the
    number kept is not found by dropping one turn at a time: it is estimated from each turn's own token count,
    checked, and corrected by steps that double and then halve: a few encodings, usually two or three.
    """
    history = list(history)

    def encode(turns):
        messages = history_to_messages(turns, query, system)
        return encode_conversation(tokenizer, template, messages, add_generation_prompt=True)[0]

    kept = {0: encode([])}  # turns kept -> ids, for the counts that fit
    if len(kept[0]) > max_prompt_tokens:
        raise PromptTooLong(f"the message is {len(kept[0])} tokens long; the limit is {max_prompt_tokens}")
    if not history:
        return kept[0], 0

    def fits(k):
        ids = encode(history[len(history) - k:])
        if len(ids) <= max_prompt_tokens:
            kept[k] = ids
        return k in kept

    # the estimate: each turn's text tokenized alone, plus what the template adds around an empty turn
    per_turn = empty_turn_tokens(tokenizer, template, system)
    sizes = [len(ids) for ids in tokenizer([u + a for u, a in history], add_special_tokens=False)["input_ids"]]
    total, estimate = len(kept[0]), 0
    while estimate < len(history) and total + sizes[-1 - estimate] + per_turn <= max_prompt_tokens:
        total += sizes[-1 - estimate] + per_turn
        estimate += 1
    lo, hi, step = 0, len(history) + 1, 1  # lo turns fit, hi turns do not (len + 1: more than there are)
    k = max(estimate, 1)
    if fits(k):
        lo = k
        while lo + step < hi:
            if not fits(lo + step):
                hi = lo + step
                break
            lo, step = lo + step, 2 * step
    else:
        hi = k
        while hi - step > lo:
            if fits(hi - step):
                lo = hi - step
                break
            hi, step = hi - step, 2 * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return kept[lo], lo


def context_length(model, tokenizer):
    n = getattr(model.config, "max_position_embeddings", None) or 2048
    tok_max = getattr(tokenizer, "model_max_length", None)
    return min(n, tok_max) if tok_max and tok_max < 10**9 else n

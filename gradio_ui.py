"""Chat with a model in the browser: replies stream in, Stop ends one, each browser tab keeps its own conversation.

    python gradio_ui.py                                   # the bundled model on http://127.0.0.1:7860
    python gradio_ui.py --lora_model output/checkpoint-final
    python gradio_ui.py --model_path models/smollm2-135m-merged --host 0.0.0.0 --port 8080
    python gradio_ui.py --num_gpus 0 --max_new_tokens 64  # a tiny CPU run
    LLAMA_QLORA_AUTH=alice:s3cret python gradio_ui.py --host 0.0.0.0   # visitors log in first
    python gradio_ui.py --share --concurrency_limit 2     # a public gradio.live link, two replies at once

One model is loaded per process and shared by every visitor; history and slider settings belong to each tab.
Replies wait in a queue (at most --max_queue) and at most --concurrency_limit are generated at once. What a
visitor sends is checked on the server, whatever the page allows: messages longer than --max_input_tokens are
refused, max_new_tokens is at most --max_new_tokens, the history the page sends back is validated and its
oldest turns dropped to fit the context.
"""

import argparse
import ipaddress
import math
import os
import sys
import threading

from utils.args import UserError, add_bool, add_generation_args, add_model_args, run_main

AUTH_ENV = "LLAMA_QLORA_AUTH"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, inference=True)
    add_generation_args(p)
    w = p.add_argument_group("Web UI")
    w.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 = every network interface (anyone who can reach it)")
    w.add_argument("--port", type=int, default=7860, help="TCP port to listen on")
    add_bool(w, "--share", False, "also serve through a public gradio.live link")
    w.add_argument("--concurrency_limit", type=int, default=1,
                   help="replies generated at once; each one holds the model for its whole reply")
    w.add_argument("--max_queue", type=int, default=16,
                   help="requests waiting for a free slot; beyond it, users are told the queue is full")
    w.add_argument("--max_request_mb", type=float, default=2,
                   help="largest request body the server reads, in MiB; larger ones are answered 413 before "
                        "any parsing (a whole conversation the page sends back is far smaller)")
    w.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help=f"ask visitors to log in with this user and password. Prefer the {AUTH_ENV} "
                        "environment variable, which other users of this machine cannot see in `ps` "
                        f"(default: ${AUTH_ENV} if set, else no login)")
    return p.parse_args(argv)


def setting_ranges(args):
    """name -> (lowest, highest) for each generation setting a visitor may change. The sliders span these, and
    the server clamps what any client sends into them; --max_new_tokens is the ceiling of max_new_tokens."""
    return {"max_new_tokens": (1, args.max_new_tokens),
            "temperature": (0.0, max(2.0, args.temperature)),
            "top_p": (0.01, 1.0),
            "top_k": (0, max(200, args.top_k)),
            "repetition_penalty": (0.5, max(2.0, args.repetition_penalty))}


def clamp_settings(values, args):
    """Generation settings from the values a client sent (in `setting_ranges` order), each clamped into its
    range; one that is not a finite number takes the launch flag's value. Built per call, never shared."""
    settings = {"seed": args.seed}
    for (name, (low, high)), value in zip(setting_ranges(args).items(), values):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        number = min(max(number, low), high) if math.isfinite(number) else getattr(args, name)
        settings[name] = int(number) if isinstance(low, int) else number
    return settings


def to_history(messages):
    """The Chatbot's value, as any client may send it -> [(user, assistant), ...]. Only the text of user and
    assistant messages counts; anything else (other roles, files, malformed entries) is ignored."""
    def text(part):
        if isinstance(part, dict):
            part = part.get("text")
        return part if isinstance(part, str) else ""

    pairs = []
    for m in messages if isinstance(messages, list) else []:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            continue
        content = m.get("content")
        content = "".join(map(text, content)) if isinstance(content, list) else text(content)
        if m["role"] == "user":
            pairs.append((content, ""))
        elif pairs:
            pairs[-1] = (pairs[-1][0], pairs[-1][1] + content)
    return pairs


def to_messages(history):  # [(user, assistant), ...] -> the Chatbot's messages format
    return [{"role": role, "content": text} for turn in history for role, text in zip(("user", "assistant"), turn)]


def build_app(chat, args):
    """The Blocks app around a loaded `utils.chat.ChatModel`; the sliders start at the values in `args`."""
    import gradio as gr

    from utils.generation import PromptTooLong, ReplyOutOfMemory

    replying = {}  # browser session -> an Event set when its reply has ended; only replies in flight

    def respond(message, shown, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                request: gr.Request):
        # The history is what this tab shows, not a gr.State: after Stop the server may have produced a delta
        # that never reached the page. So it comes from the client: validated, and cut to what can still fit.
        history = chat.recent_turns(to_history(shown))
        query = message.strip() if isinstance(message, str) else ""
        if not query:
            yield to_messages(history), message
            return
        # this tab's sliders, never another visitor's, clamped: the values may come from any client
        settings = clamp_settings((max_new_tokens, temperature, top_p, top_k, repetition_penalty), args)
        stop, ended = threading.Event(), threading.Event()
        replying[request.session_hash] = ended
        reply = ""
        try:
            yield to_messages(history + [(query, reply)]), ""
            for delta in chat.stream(history, query, settings, stop_event=stop, system=args.system):
                reply += delta
                yield to_messages(history + [(query, reply)]), ""
        except Exception as e:  # only this reply fails: drop the turn, give the message back, keep serving
            yield to_messages(history), message
            if isinstance(e, PromptTooLong):  # the visitor's to fix: a warning
                gr.Warning(str(e))
                return
            if isinstance(e, ReplyOutOfMemory):  # its memory is already freed; the next reply can run
                print(f"warning: {e}", file=sys.stderr)
                raise gr.Error(str(e)) from None
            raise gr.Error(f"generation failed: {type(e).__name__}: {e}") from e
        finally:
            # Stop, Clear, a closed tab and errors all end here: gradio closes this generator
            # (GeneratorExit at the yield), and the event ends the generation thread within one token.
            stop.set()
            ended.set()
            if replying.get(request.session_hash) is ended:
                del replying[request.session_hash]
        yield to_messages(history + [(query, reply.strip())]), ""

    def reset(request: gr.Request):
        # Clear also cancels the reply, but the browser does not wait for that: wait here until the reply
        # has ended, so that its last update reaches the page before this empty chat, never after it.
        ended = replying.get(request.session_hash)
        if ended:
            ended.wait(timeout=10)
        return [], ""

    ranges = setting_ranges(args)
    with gr.Blocks(title="LLaMA QLoRA chat") as demo:
        gr.Markdown(f"### Chat\n{chat.description}")
        chatbot = gr.Chatbot(label="Conversation", height=480)
        with gr.Row():
            message = gr.Textbox(show_label=False, placeholder="Type a message, Enter sends", scale=6)
            send = gr.Button("Send", variant="primary", scale=1)
            stop = gr.Button("Stop", scale=1)
            clear = gr.Button("Clear", scale=1)
        with gr.Accordion("Generation settings", open=False):
            sliders = [
                gr.Slider(*ranges["max_new_tokens"], value=args.max_new_tokens, step=1, label="max_new_tokens",
                          info="most tokens per reply"),
                gr.Slider(*ranges["temperature"], value=args.temperature, step=0.05, label="temperature",
                          info="0 = greedy (deterministic)"),
                gr.Slider(*ranges["top_p"], value=args.top_p, step=0.01, label="top_p",
                          info="nucleus probability mass"),
                gr.Slider(*ranges["top_k"], value=args.top_k, step=1, label="top_k", info="0 = no limit"),
                gr.Slider(*ranges["repetition_penalty"], value=args.repetition_penalty, step=0.01,
                          label="repetition_penalty", info="1 = off; above 1 discourages repeats"),
            ]
        inputs, outputs = [message, chatbot, *sliders], [chatbot, message]
        # One concurrency group for Enter and Send, so --concurrency_limit bounds the replies of both.
        # preprocess=False: respond gets the values as the client sent them and checks them itself (to_history,
        # clamp_settings): a slider value out of range is clamped rather than failing. Gradio still refuses a
        # history that is not a list of chat messages, before respond runs.
        reply = dict(fn=respond, inputs=inputs, outputs=outputs, concurrency_id="generate", preprocess=False)
        replies = [message.submit(**reply, api_name="chat"), send.click(**reply, api_visibility="private")]
        stop.click(None, cancels=replies)
        # Clear (and the Chatbot's own trash icon) must stop a running reply, or the reply refills the chat.
        # The page runs an event's listeners in order and waits for queued ones, so the cancel comes first;
        # the reset then waits for the reply to end and, queued, reaches the page after its last update.
        clearing = [clear.click, chatbot.clear]
        gr.on(clearing, None, cancels=replies)
        gr.on(clearing, reset, None, [chatbot, message], concurrency_limit=None, api_visibility="private")
    # api_open=False: direct POSTs to /run/chat are refused, so every reply goes through the queue and its limits
    demo.queue(default_concurrency_limit=args.concurrency_limit, max_size=args.max_queue, api_open=False)
    return demo


def resolve_auth(args, environ=os.environ):
    """(user, password) from --auth, else from $LLAMA_QLORA_AUTH, or None for no login."""
    value, source = (args.auth, "--auth") if args.auth is not None else (environ.get(AUTH_ENV) or None, AUTH_ENV)
    if value is None:
        return None
    user, colon, password = value.partition(":")
    if not colon or not user.strip() or not password:  # never echo the value: it may hold the password
        raise UserError(f"{source} must be USER:PASSWORD with a non-empty user and password")
    return user.strip(), password  # the login form strips the user name, so must we


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: assume it is reachable from elsewhere
        return False


def check_ui_args(args, environ=os.environ):
    """Validate the Web UI flags before any model loads; return the (user, password) to ask for, or None."""
    problems = []
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be in 0..65535, got {args.port}")
    if args.concurrency_limit < 1:
        problems.append(f"--concurrency_limit must be >= 1, got {args.concurrency_limit}")
    if args.max_queue < 1:
        problems.append(f"--max_queue must be >= 1, got {args.max_queue}")
    if not args.max_request_mb > 0:
        problems.append(f"--max_request_mb must be > 0, got {args.max_request_mb}")
    try:
        auth = resolve_auth(args, environ)
    except UserError as e:
        problems.append(str(e))
    if problems:
        raise UserError("; ".join(problems))
    exposed = ([f"--host {args.host}"] if not is_loopback(args.host) else []) + (["--share"] if args.share else [])
    if exposed and auth is None:
        print(f"warning: {' and '.join(exposed)} without a login: anyone who can reach it can use the model; "
              f"set {AUTH_ENV}=user:password", file=sys.stderr)
    if auth is not None:
        source = "--auth" if args.auth is not None else f"${AUTH_ENV}"
        print(f"login: required, user '{auth[0]}' (from {source})", file=sys.stderr)
    return auth


def main(args):
    # check, then load (the slow part), then serve until Ctrl-C
    auth = check_ui_args(args)
    from utils.chat import load_chat_model
    chat = load_chat_model(args)
    demo = build_app(chat, args)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                app_kwargs={"max_body_size": int(args.max_request_mb * 2**20)})
    return demo


if __name__ == "__main__":
    run_main(main, parse_args)

"""Chat with a model in the browser: replies stream in, Stop ends one, each browser tab keeps its own conversation.

    python gradio_ui.py                                   # the bundled model on http://127.0.0.1:7860
    python gradio_ui.py --lora_model output/checkpoint-final
    python gradio_ui.py --model_path models/smollm2-135m-merged --host 0.0.0.0 --port 8080
    python gradio_ui.py --num_gpus 0 --max_new_tokens 64  # a tiny CPU run
    python gradio_ui.py --share --concurrency_limit 2     # a public gradio.live link, two replies at once

One model is loaded per process and shared by every visitor; history and slider settings belong to each tab.
Replies wait in a queue (at most --max_queue) and at most --concurrency_limit are generated at once.
"""

import argparse
import threading

from utils.args import UserError, add_bool, add_generation_args, add_model_args, run_main


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
    return p.parse_args(argv)


def build_app(chat, args):
    """The Blocks app around a loaded `utils.chat.ChatModel`; the sliders start at the values in `args`."""
    import gradio as gr

    from utils.generation import context_length

    def to_messages(history):  # [(user, assistant), ...] -> the Chatbot's messages format
        return [{"role": role, "content": text} for turn in history
                for role, text in zip(("user", "assistant"), turn)]

    def to_history(messages):
        """The Chatbot's value -> [(user, assistant), ...]. The history is what this tab shows, not a
        gr.State: after Stop the server may have produced a delta that never reached the page."""
        pairs = []
        for m in messages or []:
            content = m["content"]
            text = content if isinstance(content, str) else "".join(c.get("text", "") for c in content)
            if m["role"] == "user":
                pairs.append((text, ""))
            elif pairs:
                pairs[-1] = (pairs[-1][0], pairs[-1][1] + text)
        return pairs

    replying = {}  # browser session -> an Event set when its reply has ended; only replies in flight

    def respond(message, shown, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                request: gr.Request):
        history, query = to_history(shown), (message or "").strip()
        if not query:
            yield to_messages(history), message
            return
        # built per call from this tab's sliders: one visitor's settings never reach another's reply
        settings = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                        top_k=int(top_k), repetition_penalty=float(repetition_penalty), seed=args.seed)
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
            if isinstance(e, ValueError):  # the message alone does not fit the context
                gr.Warning(str(e))
                return
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

    ctx = context_length(chat.model, chat.tokenizer)  # tokens; a reply leaves at least 16 for the prompt
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
                gr.Slider(1, max(args.max_new_tokens, min(4096, ctx - 16)), value=args.max_new_tokens, step=1,
                          label="max_new_tokens", info="most tokens per reply"),
                gr.Slider(0, max(2.0, args.temperature), value=args.temperature, step=0.05, label="temperature",
                          info="0 = greedy (deterministic)"),
                gr.Slider(0.01, 1.0, value=args.top_p, step=0.01, label="top_p", info="nucleus probability mass"),
                gr.Slider(0, max(200, args.top_k), value=args.top_k, step=1, label="top_k", info="0 = no limit"),
                gr.Slider(0.5, max(2.0, args.repetition_penalty), value=args.repetition_penalty, step=0.01,
                          label="repetition_penalty", info="1 = off; above 1 discourages repeats"),
            ]
        inputs, outputs = [message, chatbot, *sliders], [chatbot, message]
        # one concurrency group for Enter and Send, so --concurrency_limit bounds the replies of both
        replies = [message.submit(respond, inputs, outputs, api_name="chat", concurrency_id="generate"),
                   send.click(respond, inputs, outputs, api_visibility="private", concurrency_id="generate")]
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


def check_ui_args(args):
    problems = []
    if not 0 <= args.port <= 65535:
        problems.append(f"--port must be in 0..65535, got {args.port}")
    if args.concurrency_limit < 1:
        problems.append(f"--concurrency_limit must be >= 1, got {args.concurrency_limit}")
    if args.max_queue < 1:
        problems.append(f"--max_queue must be >= 1, got {args.max_queue}")
    if problems:
        raise UserError("; ".join(problems))


def main(args):
    # check, then load (the slow part), then serve until Ctrl-C
    check_ui_args(args)
    from utils.chat import load_chat_model
    chat = load_chat_model(args)
    demo = build_app(chat, args)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)
    return demo


if __name__ == "__main__":
    run_main(main, parse_args)

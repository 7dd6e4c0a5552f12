"""Chat with a model in the terminal. Type `clear` to forget the conversation, `exit` (or Ctrl-D) to leave.

    python cli_demo.py                                    # the bundled model
    python cli_demo.py --model_path models/smollm2-135m-merged
    python cli_demo.py --lora_model output/checkpoint-final --stream
    echo "What is QLoRA?" | python cli_demo.py --temperature 0   # scripted: one line per question

A message longer than --max_input_tokens is refused, and the oldest turns are dropped when the conversation no
longer fits the context (the same rules as the web UI, in utils/chat.py).
"""

import argparse
import sys

from utils.args import add_bool, add_generation_args, add_model_args, run_main

CLEAR, EXIT = {"clear", "/clear", "清空"}, {"exit", "quit", "/exit", "/quit", "退出"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, inference=True)
    g = add_generation_args(p)
    add_bool(g, "--stream", False, "print the reply as it is generated")
    return p.parse_args(argv)


def main(args):
    from utils.chat import load_chat_model
    from utils.generation import PromptTooLong, ReplyOutOfMemory
    chat = load_chat_model(args, log=lambda msg: print(msg, file=sys.stderr))
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type your message; `clear` starts over, `exit` leaves.", file=sys.stderr)
    history = []
    while True:
        try:
            query = input("User: " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        query = query.strip()
        if not query:
            continue
        if query.lower() in EXIT:
            break
        if query.lower() in CLEAR:
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        print("Assistant: ", end="", flush=True)
        reply = []
        try:
            stream = chat.stream(history, query, args, system=args.system)
            for delta in stream:
                reply.append(delta)
                if args.stream:
                    print(delta, end="", flush=True)
        except (PromptTooLong, ReplyOutOfMemory) as e:  # this message fails; the conversation goes on
            print(f"\n(error: {e})", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # stop this reply, keep the session
            stream.close()
            print(" [stopped]", flush=True)
            continue
        text = "".join(reply).strip()
        print("" if args.stream else text, flush=True)
        history.append((query, text))
    return history


if __name__ == "__main__":
    run_main(main, parse_args)

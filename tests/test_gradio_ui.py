"""gradio_ui.py end to end on the tiny model: a real headless Chromium streams a Chinese reply, Stop ends
the generation thread, so do Clear and a closed tab, each session keeps its own history, an error reaches
its user and the server goes on, and the queue and its concurrency limit cannot be bypassed."""

import os
import socket
import threading
import time

import pytest

import gradio_ui

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
MAX_NEW_TOKENS = 400
STEP_SECONDS = 0.025  # each forward pass is slowed to this, so a full reply takes >= 10 s: Stop is observable
FAIL_QUERY = "please fail"  # RecordingChat raises inside the stream for this query
OOM_QUERY = "please run out of memory"


class RecordingChat:
    """A ChatModel that records the stop event of each reply and fails on FAIL_QUERY after one delta."""

    def __init__(self, chat):
        self.chat, self.stop_events = chat, []

    def __getattr__(self, name):  # model, tokenizer, description, ...
        return getattr(self.chat, name)

    def stream(self, history, query, settings, stop_event=None, system=None):
        self.stop_events.append(stop_event)
        for i, delta in enumerate(self.chat.stream(history, query, settings, stop_event, system)):
            if query == FAIL_QUERY and i == 1:
                raise RuntimeError("the model broke")
            yield delta


def generation_threads():
    # utils/generation.py's stream_reply runs model.generate in a thread whose target is `work`
    return [t for t in threading.enumerate() if t.name.endswith("(work)") and t.is_alive()]


def wait_for(condition, timeout, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


@pytest.fixture(scope="module")
def chat(tiny_llama_dir):
    from utils.chat import load_chat_model
    args = gradio_ui.parse_args(["--model_path", tiny_llama_dir, "--num_gpus", "0", "--temperature", "0",
                                 "--max_new_tokens", str(MAX_NEW_TOKENS)])
    chat = load_chat_model(args, log=lambda msg: None)
    # slow every decoding step down: the output layer runs once a token in generate() and in the static decoder
    hook = chat.model.get_output_embeddings().register_forward_hook(lambda *_: time.sleep(STEP_SECONDS))
    yield RecordingChat(chat), args
    hook.remove()


@pytest.fixture(scope="module")
def server(chat):
    recording, args = chat
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        demo = gradio_ui.build_app(recording, args)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        yield f"http://127.0.0.1:{port}/", recording
        demo.close()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def full_reply(tokenizer, reply_cycle):
    """The tiny model's complete greedy reply of MAX_NEW_TOKENS tokens."""
    ids = tokenizer(reply_cycle, add_special_tokens=False)["input_ids"]
    return tokenizer.decode((ids * (MAX_NEW_TOKENS // len(ids) + 1))[:MAX_NEW_TOKENS]).strip()


def message_text(message):  # a Chatbot message as gradio_client returns it
    content = message["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def send(page, text):
    page.get_by_placeholder("Type a message").fill(text)
    page.get_by_role("button", name="Send").click()


@pytest.mark.browser
def test_reply_streams_in_chinese_then_stop_ends_generation_and_clear_empties(server, browser, tiny_llama_reply):
    url, chat = server
    full = full_reply(chat.tokenizer, tiny_llama_reply)
    page = browser.new_page()
    page.goto(url)
    send(page, "你好, hello")
    bot = page.locator("[data-testid='bot']")
    samples = []
    deadline = time.monotonic() + 30
    while len({len(s) for s in samples if s}) < 3 and time.monotonic() < deadline:
        samples.append(bot.last.inner_text() if bot.count() else "")
        time.sleep(0.1)
    assert len({len(s) for s in samples if s}) >= 3, f"the reply did not grow over several updates: {samples}"
    assert len(generation_threads()) == 1  # the thread this test watches below is really there

    page.get_by_role("button", name="Stop").click()
    assert wait_for(lambda: not generation_threads(), timeout=5), "Stop did not end the generation thread"
    assert chat.stop_events[-1].is_set()
    stopped = bot.last.inner_text()
    time.sleep(1.5)
    assert bot.last.inner_text() == stopped, "the reply kept changing after Stop"
    assert 0 < len(stopped) < len(full)
    for text in samples + [stopped]:  # every streamed state is a clean prefix: no cut character, no U+FFFD
        assert "\ufffd" not in text
        assert full.startswith(text.strip()), text

    # a message too long for the context: a warning to this user, the chat unchanged, the message kept
    send(page, "hello " * 2000)
    toast = page.get_by_text("the limit is")
    toast.wait_for(timeout=10_000)
    assert bot.count() == 1 and bot.last.inner_text() == stopped
    assert page.get_by_placeholder("Type a message").input_value().startswith("hello hello")

    messages = page.locator("[data-testid='user'], [data-testid='bot']")
    our_clear, chatbot_trash_icon = page.get_by_text("Clear", exact=True), page.get_by_label("Clear", exact=True)
    our_clear.click()
    assert wait_for(lambda: messages.count() == 0, timeout=5)

    # Clear in the middle of a reply (our button, then the Chatbot's own icon): the reply stops and none
    # of its late updates refills the chat; the next turn starts a fresh conversation
    for clear in (our_clear, chatbot_trash_icon):
        send(page, "again")
        assert wait_for(lambda: bot.count() and bot.last.inner_text(), timeout=15)
        assert [u.inner_text() for u in page.locator("[data-testid='user']").all()] == ["again"]
        assert generation_threads()
        clear.click()
        assert wait_for(lambda: not generation_threads(), timeout=5), "Clear did not end the generation thread"
        time.sleep(0.5)
        assert messages.count() == 0, f"the chat was refilled after Clear: {bot.last.inner_text()!r}"
    page.close()


@pytest.mark.browser
def test_closing_the_tab_ends_generation(server, browser):
    url, chat = server
    page = browser.new_page()
    page.goto(url)
    send(page, "hello")
    assert wait_for(lambda: page.locator("[data-testid='bot']").count()
                    and page.locator("[data-testid='bot']").last.inner_text(), timeout=15)
    assert len(generation_threads()) == 1
    page.close()
    # the full reply would take another >= 8 s
    assert wait_for(lambda: not generation_threads(), timeout=5), "a closed tab kept its generation running"
    assert chat.stop_events[-1].is_set()


@pytest.mark.browser
def test_sessions_keep_their_own_history(server, browser):
    url, _ = server
    pages = {}
    for name in ("alice", "bob"):  # separate browser contexts: separate cookies and gradio sessions
        pages[name] = browser.new_context().new_page()
        pages[name].goto(url)

    def turn(name, text):
        page = pages[name]
        bot = page.locator("[data-testid='bot']")
        before = bot.count()
        send(page, text)
        assert wait_for(lambda: bot.count() > before and bot.last.inner_text(), timeout=15)
        page.get_by_role("button", name="Stop").click()
        assert wait_for(lambda: not generation_threads(), timeout=5)
        return [u.inner_text() for u in page.locator("[data-testid='user']").all()]

    assert turn("alice", "alice asks") == ["alice asks"]
    assert turn("bob", "bob asks") == ["bob asks"]
    assert turn("alice", "alice again") == ["alice asks", "alice again"]
    assert turn("bob", "bob again") == ["bob asks", "bob again"]
    for page in pages.values():
        page.context.close()


def test_concurrency_limit_holds_and_direct_api_is_closed(server):
    import httpx
    from gradio_client import Client
    url, _ = server
    jobs = [Client(url, verbose=False).submit(f"question {i}", [], 20, 0, 0.9, 40, 1.0, api_name="/chat")
            for i in range(2)]
    most = 0
    while not all(job.done() for job in jobs):
        most = max(most, len(generation_threads()))
        time.sleep(0.01)
    assert [len(job.result()[0]) for job in jobs] == [2, 2]
    assert most == 1, f"{most} replies were generated at once; --concurrency_limit is 1"

    # the REST route that would skip the queue (and its limit) is refused
    r = httpx.post(url + "gradio_api/run/chat", json={"data": ["hi", [], 4, 0, 0.9, 40, 1.0]}, timeout=10)
    assert r.status_code == 404 and "join the queue" in r.text


def test_a_failing_reply_reaches_its_user_and_the_server_goes_on(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    url, _ = server
    client = Client(url, verbose=False)
    earlier = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "hello!"}]}]
    job = client.submit(FAIL_QUERY, earlier, 6, 0, 0.9, 40, 1.0, api_name="/chat")
    with pytest.raises(AppError, match="generation failed: RuntimeError: the model broke"):
        job.result()
    messages, textbox = job.outputs()[-1]  # the failed turn is dropped and the message given back
    assert [(m["role"], message_text(m)) for m in messages] == [("user", "hi"), ("assistant", "hello!")]
    assert textbox == FAIL_QUERY
    assert wait_for(lambda: not generation_threads(), timeout=5)

    messages, textbox = client.predict("still there?", earlier, 6, 0, 0.9, 40, 1.0, api_name="/chat")
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2 and textbox == ""
    assert message_text(messages[2]) == "still there?" and message_text(messages[3])


def test_out_of_memory_in_one_reply_reaches_its_user_and_the_server_goes_on(server, inject_out_of_memory,
                                                                           monkeypatch):
    import torch
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    url, chat = server
    raised = inject_out_of_memory(chat.model, chat.tokenizer, OOM_QUERY)
    client = Client(url, verbose=False)
    earlier = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "hello!"}]}]
    emptied = []
    with monkeypatch.context() as cuda:  # as on a GPU machine, to see that the CUDA cache is emptied
        cuda.setattr(torch.cuda, "is_available", lambda: True)
        cuda.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
        job = client.submit(OOM_QUERY, earlier, 20, 0, 0.9, 40, 1.0, api_name="/chat")
        with pytest.raises(AppError, match="^out of memory while generating this reply; try a shorter"):
            job.result()
    assert raised == [1] and emptied == [1]
    messages, textbox = job.outputs()[-1]  # the failed turn is dropped and the message given back
    assert [(m["role"], message_text(m)) for m in messages] == [("user", "hi"), ("assistant", "hello!")]
    assert textbox == OOM_QUERY
    assert wait_for(lambda: not generation_threads(), timeout=5)

    messages, textbox = client.predict("still there?", earlier, 6, 0, 0.9, 40, 1.0, api_name="/chat")
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2 and textbox == ""
    assert message_text(messages[2]) == "still there?" and message_text(messages[3])


def test_parse_args_defaults_and_booleans():
    args = gradio_ui.parse_args([])
    assert (args.host, args.port, args.share, args.concurrency_limit, args.max_queue) == ("127.0.0.1", 7860,
                                                                                          False, 1, 16)
    assert args.system is None and args.use_8bit is False
    assert gradio_ui.parse_args(["--share"]).share is True
    assert gradio_ui.parse_args(["--share=False"]).share is False
    assert gradio_ui.parse_args(["--share", "--no-share"]).share is False
    assert gradio_ui.parse_args(["--load_8bit=False"]).use_8bit is False
    assert gradio_ui.parse_args(["--load_8bit"]).use_8bit is True
    with pytest.raises(SystemExit):
        gradio_ui.parse_args(["--share=maybe"])


def test_main_rejects_bad_ui_flags_before_loading(monkeypatch):
    from utils.args import UserError
    monkeypatch.setattr("utils.chat.load_chat_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(UserError, match="--concurrency_limit.*--max_queue"):
        gradio_ui.main(gradio_ui.parse_args(["--concurrency_limit", "0", "--max_queue", "0"]))


@pytest.mark.parametrize("flag, env, expected", [
    (None, None, None),
    (None, "", None),  # an empty variable is no login
    (None, "alice:s3cret", ("alice", "s3cret")),
    ("bob:pass:with:colons", None, ("bob", "pass:with:colons")),
    ("bob:flag", "alice:env", ("bob", "flag")),  # the flag wins
    (" carol :p w", None, ("carol", "p w")),  # the login form strips the user name, never the password
])
def test_auth_from_flag_or_environment(flag, env, expected):
    args = gradio_ui.parse_args([] if flag is None else ["--auth", flag])
    assert gradio_ui.resolve_auth(args, {} if env is None else {gradio_ui.AUTH_ENV: env}) == expected


@pytest.mark.parametrize("flag, env, source", [
    ("nocolon", None, "--auth"), (":password", None, "--auth"), ("user:", None, "--auth"), ("", None, "--auth"),
    (None, "alice", "LLAMA_QLORA_AUTH"), (None, "  :secret", "LLAMA_QLORA_AUTH"),
])
def test_malformed_auth_is_refused_without_showing_it(flag, env, source):
    from utils.args import UserError
    args = gradio_ui.parse_args([] if flag is None else ["--auth", flag])
    with pytest.raises(UserError, match=f"^{source} must be USER:PASSWORD with a non-empty user and password$"):
        gradio_ui.resolve_auth(args, {} if env is None else {gradio_ui.AUTH_ENV: env})


def test_malformed_auth_stops_the_script_before_loading(tiny_llama_dir):
    import subprocess
    import sys
    env = dict(os.environ, LLAMA_QLORA_AUTH="secret-without-colon")
    r = subprocess.run([sys.executable, "gradio_ui.py", "--model_path", tiny_llama_dir, "--port", "99999"],
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("error: --port must be in 0..65535, got 99999; LLAMA_QLORA_AUTH must be USER:PASSWORD "
                        "with a non-empty user and password\n")


@pytest.mark.parametrize("argv, env, warned", [
    ([], {}, None),
    (["--host", "localhost"], {}, None),
    (["--host", "::1"], {}, None),
    (["--host", "0.0.0.0"], {}, "--host 0.0.0.0"),
    (["--host", "my-server.example"], {}, "--host my-server.example"),
    (["--share"], {}, "--share"),
    (["--host", "0.0.0.0", "--share"], {}, "--host 0.0.0.0 and --share"),
    (["--host", "0.0.0.0", "--share"], {"LLAMA_QLORA_AUTH": "a:b"}, None),
])
def test_exposed_without_login_warns_in_one_line(argv, env, warned, capsys):
    auth = gradio_ui.check_ui_args(gradio_ui.parse_args(argv), env)
    lines = capsys.readouterr().err.splitlines()
    warnings = [line for line in lines if line.startswith("warning:")]
    if warned is None:
        assert warnings == []
    else:
        assert warnings == [f"warning: {warned} without a login: anyone who can reach it can use the model; "
                            "set LLAMA_QLORA_AUTH=user:password"]
    assert (auth is not None) == bool(env)
    if auth:
        assert lines == ["login: required, user 'a' (from $LLAMA_QLORA_AUTH)"]


def test_history_from_a_client_is_validated():
    def text(t):
        return [{"type": "text", "text": t}]
    sent = [
        {"role": "assistant", "content": text("an answer before any question: dropped")},
        {"role": "user", "content": text("q1")},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "file", "file": {"path": "x"}},
                                          {"type": "text", "text": "1"}, "!", 7, {"text": None}]},
        {"role": "system", "content": text("ignored")},
        "not a message", None, 3, {"content": text("no role")}, {"role": "user"},  # the last: an empty question
        {"role": "user", "content": "plain string content"},
    ]
    assert gradio_ui.to_history(sent) == [("q1", "a1!"), ("", ""), ("plain string content", "")]
    for junk in (None, "text", 5, {"role": "user"}, [[["deep"]]]):
        assert gradio_ui.to_history(junk) == []


def test_settings_from_a_client_are_clamped_to_the_launch_limits():
    args = gradio_ui.parse_args(["--max_new_tokens", "100", "--temperature", "0.7", "--top_k", "40", "--seed", "3"])
    ok = gradio_ui.clamp_settings((50, 0.5, 0.9, 10, 1.2), args)
    assert ok == dict(max_new_tokens=50, temperature=0.5, top_p=0.9, top_k=10, repetition_penalty=1.2, seed=3)
    assert isinstance(ok["max_new_tokens"], int) and isinstance(ok["top_k"], int)
    high = gradio_ui.clamp_settings((10**9, 1e9, 5, 10**9, 1e9), args)
    assert high == dict(max_new_tokens=100, temperature=2.0, top_p=1.0, top_k=200, repetition_penalty=2.0, seed=3)
    low = gradio_ui.clamp_settings((-5, -1, -1, -1, 0), args)
    assert low == dict(max_new_tokens=1, temperature=0.0, top_p=0.01, top_k=0, repetition_penalty=0.5, seed=3)
    junk = gradio_ui.clamp_settings(("lots", float("nan"), None, [1], float("inf")), args)
    assert junk == dict(max_new_tokens=100, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1, seed=3)

"""The `lmforge serve` playground page in a real browser: Debian's chromium, headless, driven through selenium.

A tiny GPT is trained in the test for a few seconds on English lines and Chinese poems (so greedy replies are real
text, Chinese characters included, rather than random byte tokens), served by `python -m lmforge serve` in a
subprocess on 127.0.0.1, and the page at GET / is driven as a user would: what it streams must equal what a plain,
non-streamed request returns for the same greedy settings, Chinese must arrive whole (no U+FFFD), Stop must end a
reply early without an error, and with --api-key the server's 401 message shows until the key is typed in. The
server's own event stream is also replayed to the page one byte per read (every character cut apart) and with an
error event spliced in, paths real network reads on 127.0.0.1 do not reliably take.

Needs chromium and chromedriver (`bash scripts/system-packages.sh test`); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from lmforge import GPTConfig, GPTForCausalLM, Tokenizer

httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
API_KEY = "test-key-7f3a"
STARTUP_SECONDS = 60  # the server imports torch and loads the model before /health says 200
WAIT_SECONDS = 60  # the longest any page condition is waited for

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be, or not to be, that is the question.",
    "All that glitters is not gold.",
]
POEMS = [
    ("床前明月光", "疑是地上霜。举头望明月，低头思故乡。"),
    ("白日依山尽", "黄河入海流。欲穷千里目，更上一层楼。"),
    ("春眠不觉晓", "处处闻啼鸟。夜来风雨声，花落知多少。"),
]


# ------------------------------------------------------------------------------ the model and the servers
def build_model_dir(directory: Path) -> Path:
    """A 2-layer GPT (64 wide, 256 positions) and a 400-token byte-level BPE, trained to memorise a few lines: each
    poem's first line as a user turn of the server's default chat template and the rest as the reply."""
    texts = ENGLISH + [f"User: {q}\n\nAssistant: {a}\n\n" for q, a in POEMS] + [q + a for q, a in POEMS]
    tok = Tokenizer.train_bpe(iterator=texts * 4, vocab_size=400)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=len(tok),
        n_positions=256,  # room for a prompt and the 200 new tokens of the Stop test
        n_layer=2,
        n_head=2,
        n_embd=64,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = GPTForCausalLM(config)
    rows = [tok.encode(t) for t in texts]
    labels = torch.full((len(rows), max(map(len, rows))), -100)
    for i, row in enumerate(rows):
        labels[i, : len(row)] = torch.tensor(row)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(labels.clamp(min=0), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2  # memorised: greedy replies are the lines above, not random bytes
    model.eval().save_pretrained(directory, tokenizer=tok)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("playground") / "poet")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(model_dir: Path, log: Path, *options: str) -> Iterator[str]:
    """`python -m lmforge serve` on a free port of 127.0.0.1; yields its base URL once /health is 200 and always
    ends it (SIGTERM, then SIGKILL if it has not exited 20 s later)."""
    port = free_port()
    command = [sys.executable, "-m", "lmforge", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen([*command, *options], stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"lmforge serve exited with {process.returncode}:\n{log.read_text(errors='replace')}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(f"/health not 200 within {STARTUP_SECONDS} s:\n{log.read_text(errors='replace')}")
            time.sleep(0.2)  # poll interval, not a timing assumption
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(model_dir, tmp_path_factory.mktemp("logs") / "serve.log") as base:
        yield base


@pytest.fixture(scope="module")
def keyed_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(model_dir, tmp_path_factory.mktemp("logs") / "serve-key.log", "--api-key", API_KEY) as base:
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless chromium with Debian's chromedriver, both named explicitly: selenium-manager never downloads."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("chromium and chromedriver are needed: bash scripts/system-packages.sh test")
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


# ------------------------------------------------------------------------------ the page, as a user drives it
class Page:
    """The playground at `base`: fields by their ids, waits bounded by WAIT_SECONDS."""

    def __init__(self, driver: Any, base: str) -> None:
        self.driver = driver
        driver.get(f"{base}/")
        self.wait = WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.05)

    def el(self, id_: str) -> Any:
        return self.driver.find_element(By.ID, id_)

    def text(self, id_: str) -> str:
        """The element's text exactly as inserted (textContent: no whitespace folding)."""
        return self.el(id_).get_property("textContent")

    def until(self, condition: Any, what: str) -> Any:
        try:
            return self.wait.until(lambda _: condition())
        except TimeoutException:
            pytest.fail(f"{what} not seen in {WAIT_SECONDS} s; #status={self.text('status')!r}")

    def fill(self, id_: str, value: str) -> None:
        field = self.el(id_)
        field.clear()
        field.send_keys(value)

    def settings(self, mode: str, temperature: str, max_tokens: str) -> None:
        Select(self.el("mode")).select_by_value(mode)
        self.fill("temperature", temperature)
        self.fill("max_tokens", max_tokens)

    def replies(self) -> int:
        """How many replies have ended on this page (done, stopped or failed): #status's data-replies."""
        return int(self.el("status").get_attribute("data-replies"))

    def send(self, keyboard: bool = False) -> str:
        """Sends (the Send button, or Ctrl+Enter in the prompt), waits until that reply has ended; returns #status."""
        before = self.replies()
        if keyboard:
            self.el("prompt").send_keys(Keys.CONTROL, Keys.ENTER)
        else:
            self.el("send").click()
        return self.finished(before)

    def finished(self, before: int) -> str:
        """Waits until more than `before` replies have ended; returns #status."""
        self.until(lambda: self.replies() > before, "the end of the reply")
        return self.text("status")

    def turns(self) -> list[tuple[str, str]]:
        """The chat conversation on screen: (role, text) per turn."""
        turns = self.driver.find_elements(By.CSS_SELECTOR, "#conversation .turn")
        return [
            (
                t.find_element(By.CLASS_NAME, "role").get_property("textContent"),
                t.find_element(By.CLASS_NAME, "text").get_property("textContent"),
            )
            for t in turns
        ]


@contextmanager
def slow_network(driver: Any, bytes_per_second: int) -> Iterator[None]:
    """DevTools' network throttling for the page: the reply arrives slowly enough for a click to land mid-stream."""
    conditions = {"offline": False, "latency": 0, "uploadThroughput": -1}
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", {**conditions, "downloadThroughput": bytes_per_second})
    try:
        yield
    finally:
        driver.execute_cdp_cmd("Network.emulateNetworkConditions", {**conditions, "downloadThroughput": -1})


def tokens_per_second(stats: str) -> float:
    found = re.search(r"([0-9.]+) tokens/s", stats)
    assert found, stats
    return float(found.group(1))


def completion(base: str, prompt: str, max_tokens: int, **headers: str) -> dict[str, Any]:
    body = {"prompt": prompt, "temperature": 0, "max_tokens": max_tokens}
    response = httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def chat(base: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens}
    response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def reply(answer: dict[str, Any]) -> str:
    return answer["choices"][0]["message"]["content"]


# ------------------------------------------------------------------------------ tests
def test_completion_streams_exactly_the_greedy_text(server: str, browser: Any, model_dir: Path) -> None:
    prompt = "The quick brown"
    expected = completion(server, prompt, 12)["choices"][0]["text"]
    assert expected.strip()  # a real continuation to compare against

    page = Page(browser, server)
    page.until(lambda: page.text("model") == model_dir.name, "the model name from /v1/models")
    page.settings("completion", "0", "12")
    page.fill("prompt", prompt)
    assert page.send().startswith("done"), page.text("status")
    assert page.text("output") == expected
    assert page.text("prompt-echo") == prompt
    stats = page.text("stats")
    assert tokens_per_second(stats) > 0
    assert "12 tokens" in stats  # usage from the last chunk (include_usage), not the chunk count
    assert page.el("send").is_enabled() and not page.el("stop").is_enabled()

    # text goes in as text: markup in the prompt is shown, never parsed
    markup = '<img src="x" onerror="document.title = 1">The quick brown'
    page.fill("prompt", markup)
    page.fill("max_tokens", "3")
    assert page.send().startswith("done"), page.text("status")
    assert (
        page.text("prompt-echo") == markup
        and page.text("output") == completion(server, markup, 3)["choices"][0]["text"]
    )
    assert not browser.find_elements(By.CSS_SELECTOR, "#completion-view img")


def test_chinese_chat_arrives_whole_and_keeps_the_conversation(server: str, browser: Any) -> None:
    first = [{"role": "user", "content": "床前明月光"}]
    expected = reply(chat(server, first, 24))
    assert re.search(r"[\u4e00-\u9fff]", expected) and "\ufffd" not in expected

    page = Page(browser, server)
    page.settings("chat", "0", "24")
    page.fill("prompt", "床前明月光")
    assert page.send(keyboard=True).startswith("done"), page.text("status")  # Ctrl+Enter sends too
    shown = page.text("output")
    assert shown == expected and "\ufffd" not in shown
    assert page.text("prompt") == ""  # the message moved into the conversation
    assert page.turns() == [("user", "床前明月光"), ("assistant", expected)]

    # a second turn sends the whole history, as the plain request below does
    second = [*first, {"role": "assistant", "content": expected}, {"role": "user", "content": "白日依山尽"}]
    expected_second = reply(chat(server, second, 24))
    page.fill("prompt", "白日依山尽")
    assert page.send().startswith("done"), page.text("status")
    assert page.text("output") == expected_second and "\ufffd" not in expected_second
    assert page.turns() == [
        ("user", "床前明月光"),
        ("assistant", expected),
        ("user", "白日依山尽"),
        ("assistant", expected_second),
    ]


def test_json_output_in_chat_asks_for_json_mode(server: str, browser: Any) -> None:
    """The chat view's JSON checkbox sends response_format json_object: the reply shown is the server's JSON-mode
    answer for the same request (an object, or its beginning when max tokens cut it)."""
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 40,
            "response_format": {"type": "json_object"}}  # fmt: skip
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    expected = reply(response.json())
    assert expected.startswith("{") and expected != reply(chat(server, body["messages"], 40))

    page = Page(browser, server)
    page.settings("chat", "0", "40")
    page.el("json_mode").click()
    page.fill("prompt", "hi")
    assert page.send().startswith("done"), page.text("status")
    assert page.text("output") == expected


def test_stop_ends_a_long_reply_early(server: str, browser: Any) -> None:
    prompt = "All that glitters"
    full = completion(server, prompt, 200)
    assert full["usage"]["completion_tokens"] == 200 and full["choices"][0]["finish_reason"] == "length"
    full_text = full["choices"][0]["text"]

    page = Page(browser, server)
    page.settings("completion", "0", "200")
    page.fill("prompt", prompt)
    # The tiny model writes 200 tokens faster than a click lands, so the network is slowed (~1 KB/s: the reply's
    # ~40 KB of events would take 40 s) to stop it surely mid-stream.
    with slow_network(browser, 1000):
        before = page.replies()
        page.el("send").click()
        page.until(lambda: page.text("output") != "", "the first streamed text")
        page.el("stop").click()
        status = page.finished(before)
    assert status.startswith("stopped"), status
    partial = page.text("output")
    assert partial and full_text.startswith(partial) and len(partial) < len(full_text)
    counted = re.search(r"≈(\d+) tokens", page.text("stats"))  # no usage chunk came: the chunks are counted
    assert counted and 0 < int(counted.group(1)) < 200, page.text("stats")

    # the page is ready for the next reply
    page.fill("max_tokens", "5")
    assert page.send().startswith("done"), page.text("status")
    assert page.text("output") == completion(server, prompt, 5)["choices"][0]["text"]


def test_api_key_401_until_the_key_is_typed(keyed_server: str, browser: Any, model_dir: Path) -> None:
    refused = httpx.get(f"{keyed_server}/v1/models", timeout=10)
    assert refused.status_code == 401
    message = refused.json()["error"]["message"]
    assert message

    page = Page(browser, keyed_server)
    page.until(lambda: page.text("status").startswith("error"), "the 401 from /v1/models")
    assert message in page.text("status") and "401" in page.text("status")
    assert page.text("model") == "—"

    page.settings("completion", "0", "8")
    page.fill("prompt", "To be, or not")
    status = page.send()
    assert status.startswith("error") and message in status and page.text("output") == ""

    page.fill("api_key", "wrong-key")
    status = page.send()
    assert status.startswith("error") and message in status

    page.fill("api_key", API_KEY)
    page.until(lambda: page.text("model") == model_dir.name, "the model name once the key is typed")
    assert page.text("status") == "idle"
    assert page.send().startswith("done"), page.text("status")
    expected = completion(keyed_server, "To be, or not", 8, Authorization=f"Bearer {API_KEY}")
    assert page.text("output") == expected["choices"][0]["text"]

    # the key is kept for the tab (sessionStorage): a reload still has it and is let in
    page = Page(browser, keyed_server)
    assert page.el("api_key").get_property("value") == API_KEY
    page.until(lambda: page.text("model") == model_dir.name, "the model name after a reload")


# Replays recorded bytes as the response body of the page's next POST to `path`, one read per slice.
REPLAY = """
const [path, slices] = arguments;
const realFetch = window.fetch;
window.fetch = (url, init) => {
  if (url !== path) return realFetch(url, init);
  window.fetch = realFetch;
  const body = new ReadableStream({
    pull(controller) {
      if (slices.length) controller.enqueue(new Uint8Array(slices.shift()));
      else controller.close();
    },
  });
  return Promise.resolve(new Response(body, {status: 200, headers: {"Content-Type": "text/event-stream"}}));
};
"""


@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
def test_characters_cut_between_reads_arrive_whole(server: str, browser: Any, line_end: str) -> None:
    """The server's own event stream for a Chinese reply, handed to the page one byte per read (every character cut
    apart, and a CRLF variant cut between its CR and LF): the page must show exactly the non-streamed reply."""
    messages = [{"role": "user", "content": "春眠不觉晓"}]
    answer = chat(server, messages, 24)
    expected = reply(answer)
    assert re.search(r"[\u4e00-\u9fff]", expected)
    body = {"messages": messages, "temperature": 0, "max_tokens": 24, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        recorded = response.read()
    assert recorded.endswith(b"data: [DONE]\n\n") or recorded.endswith(b"data: [DONE]\r\n\r\n")
    recorded = recorded.replace(b"\r\n", b"\n").replace(b"\n", line_end.encode())
    slices = [[byte] for byte in recorded]

    page = Page(browser, server)
    page.settings("chat", "0", "24")
    page.fill("prompt", "春眠不觉晓")
    browser.execute_script(REPLAY, "/v1/chat/completions", slices)
    assert page.send().startswith("done"), page.text("status")
    assert page.text("output") == expected and "\ufffd" not in page.text("output")
    tokens = answer["usage"]["completion_tokens"]
    assert page.text("stats").startswith(f"{tokens} tokens ·"), page.text("stats")  # the usage chunk was parsed too


def test_an_error_event_mid_stream_is_shown_and_the_text_so_far_kept(server: str, browser: Any) -> None:
    """The server's first text events, then an error event in its shape (as it sends when generation fails after
    the stream started) and [DONE]: the page shows the error's message and keeps the text that came before it."""
    body = {"prompt": "To be, or not", "temperature": 0, "max_tokens": 12, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = [e for e in response.read().split(b"\n\n") if e.startswith(b"data: {")]
    kept = events[:3]
    text = "".join(json.loads(e[len(b"data: ") :])["choices"][0]["text"] for e in kept)
    assert text
    error = {"message": "generation failed: RuntimeError", "type": "server_error", "param": None, "code": None}
    stream = b"\n\n".join([*kept, b"data: " + json.dumps({"error": error}).encode(), b"data: [DONE]", b""])

    page = Page(browser, server)
    page.settings("completion", "0", "12")
    page.fill("prompt", "To be, or not")
    browser.execute_script(REPLAY, "/v1/completions", [list(stream)])
    assert page.send() == "error: generation failed: RuntimeError"
    assert page.text("output") == text

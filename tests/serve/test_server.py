"""`minigpt serve` driven as users drive it: a real server process on 127.0.0.1 and the
official `openai` client (plus raw HTTP where the client would hide what is sent back).

The model is a tiny random character-level GPT (dense and banded layers) saved as a model
folder; every served text is compared with `minigpt.generate` on the same folder."""
from __future__ import annotations

import copy
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import http.client
import urllib.error
import urllib.request

import pytest
import torch

# The serve extra (FastAPI, uvicorn) and the openai client come with the [test] extra; a machine
# that cannot install them (the lent GPU machine) skips these.
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the openai client is not installed: pip install -e '.[test]'")

from minigpt import GPT, GPTConfig
from minigpt.finetune.export import META_FILE, FinetuneMeta
from minigpt.generate import generate_text
from minigpt.tokenizer import CharTokenizer, load_tokenizer, save_tokenizer
from scripts.checkout import child_env
from tests.helpers import randomize_

CHARS = "\n abcdefghijklmnopqrstuvwxyz.,->"
KEY = "test-key"


def _model_folder(folder: Path, meta: FinetuneMeta | None = None, slow: bool = False) -> Path:
    """A random character-level model; `slow` is wide and long enough (a few ms a token,
    1024 positions) that a request is still decoding when a test acts on it."""
    torch.manual_seed(0)
    size = dict(block_size=1024, n_layer=4, n_head=4, n_embd=256) if slow else \
        dict(block_size=64, n_layer=2, n_head=2, n_embd=32)
    config = GPTConfig(vocab_size=len(CHARS), attention_pattern=("dense", "banded"), attention_window=8, **size)
    model = randomize_(GPT(config), std=0.5)
    model.save_pretrained(folder)
    save_tokenizer(CharTokenizer(CHARS), folder, config.block_size)
    if meta is not None:
        (folder / META_FILE).write_text(json.dumps(meta.__dict__))
    return folder


class Reply:
    """A raw HTTP answer: what the openai client would turn into objects or exceptions."""

    def __init__(self, status: int, text: str) -> None:
        self.status_code, self.text = status, text

    def json(self):
        return json.loads(self.text)


def _http(method: str, url: str, body: dict | bytes | None = None, key: str | None = None) -> Reply:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return Reply(response.status, response.read().decode())
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.read().decode())


def _health(server) -> dict:
    return _http("GET", f"{server.url}/health").json()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m minigpt serve ...` in a process of its own, up once /health answers."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "minigpt", "serve", "--model", str(folder), "--port", str(self.port),
             "--threads", "1", *args], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if _http("GET", f"{self.url}/health").status_code == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("the server did not answer /health within 60 s")

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def close(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.stdout.read()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _model_folder(tmp_path_factory.mktemp("served") / "tiny")


@pytest.fixture(scope="module")
def server(folder):
    s = Server(folder, "--api-key", KEY, "--max-batch", "4")
    yield s
    s.close()


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    s = Server(_model_folder(tmp_path_factory.mktemp("slow") / "slow", slow=True))
    yield s
    s.close()


@pytest.fixture(scope="module")
def local(folder):
    """The same model in this process, the reference every served text is compared with."""
    return GPT.from_pretrained(folder).eval(), load_tokenizer(folder)


def _reference(local, prompt: str, n: int, **kwargs) -> str:
    model, tokenizer = local
    return generate_text(model, tokenizer, prompt, n, **kwargs)[0]


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == ["tiny"]
    assert _health(server)["status"] == "ok"


def test_greedy_completions_equal_generate(server, local):
    prompts = ["the cat sat", "a", "hello there, friend"]
    out = server.client().completions.create(model="tiny", prompt=prompts, max_tokens=20, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, out.choices):
        assert choice.text == _reference(local, prompt, 20, temperature=0)
        assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == sum(map(len, prompts)) and out.usage.completion_tokens == 60
    assert out.usage.total_tokens == out.usage.prompt_tokens + 60 and out.object == "text_completion"


def test_a_bfloat16_server_completes_as_the_model_in_bfloat16_does(folder, local):
    served = Server(folder, "--dtype", "bfloat16")
    try:
        out = served.client().completions.create(model="tiny", prompt=["the cat sat", "a"], max_tokens=12,
                                                 temperature=0)
    finally:
        served.close()
    half = (copy.deepcopy(local[0]).to(torch.bfloat16), local[1])  # .to() on the fixture's own model would change it
    for prompt, choice in zip(["the cat sat", "a"], out.choices):
        assert choice.text == _reference(half, prompt, 12, temperature=0)


def test_a_completion_longer_than_the_context_slides_as_generate_does(server, local):
    out = server.client().completions.create(model="tiny", prompt="the cat sat on", max_tokens=90, temperature=0)
    assert out.choices[0].text == _reference(local, "the cat sat on", 90, temperature=0)
    assert out.usage.completion_tokens == 90


def test_token_id_prompts_are_accepted(server, local):
    _, tokenizer = local
    ids = [tokenizer.encode("the cat"), tokenizer.encode("zz")]
    out = server.client().completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert [c.text for c in out.choices] == [_reference(local, t, 8, temperature=0) for t in ("the cat", "zz")]


def test_seeded_choices_are_reproducible_and_each_its_own(server, local):
    client = server.client()
    kwargs = dict(model="tiny", prompt="once upon", max_tokens=16, temperature=1.0, seed=7, n=3,
                  extra_body={"top_k": 12})  # top_k: an extension the client passes through
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    for c in a.choices:  # choice c samples with seed + c
        assert c.text == _reference(local, "once upon", 16, temperature=1.0, top_k=12, seed=7 + c.index)
    assert len({c.text for c in a.choices}) > 1


def test_streaming_gives_the_same_text_in_pieces_and_ends_with_done(server, local):
    client = server.client()
    pieces, finishes = [], []
    for chunk in client.completions.create(model="tiny", prompt="the cat sat", max_tokens=24, temperature=0,
                                           stream=True):
        pieces.append(chunk.choices[0].text)
        finishes.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == _reference(local, "the cat sat", 24, temperature=0)
    # How many chunks depends on the machine's load: the server sends what arrived together in
    # one chunk (app.py, `stream`), so a busy machine may see all 24 tokens in one.
    assert finishes[-1] == "length" and len(pieces) >= 2 and all(f is None for f in finishes[:-1])
    raw = _http("POST", f"{server.url}/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 3,
                                                          "stream": True, "stream_options": {"include_usage": True}},
                key=KEY).text
    events = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 3


def test_stop_strings_are_not_included(server, local):
    out = server.client().completions.create(model="tiny", prompt="hello there, friend", max_tokens=40,
                                             temperature=0, stop=["e", ","])
    choice = out.choices[0]
    assert choice.text == _reference(local, "hello there, friend", 40, temperature=0, stop=["e", ","])
    assert "e" not in choice.text and "," not in choice.text
    assert choice.finish_reason == ("stop" if len(choice.text) < 40 else "length")


def test_echo_and_logprobs_score_the_prompt_itself(server, local):
    model, tokenizer = local
    prompt = "the quick brown fox"
    out = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    choice = out.choices[0]
    assert choice.text == prompt and choice.logprobs.tokens == list(prompt)
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        logp = torch.log_softmax(model.double()(torch.tensor([ids])).logits[0], dim=-1)  # float64 reference
    model.float()
    assert choice.logprobs.token_logprobs[0] is None
    for i, got in enumerate(choice.logprobs.token_logprobs[1:]):
        assert got == pytest.approx(float(logp[i, ids[i + 1]]), abs=1e-4)  # served in float32
    assert all(len(t) == 3 for t in choice.logprobs.top_logprobs[1:])
    assert choice.logprobs.text_offset == list(range(len(prompt)))


def test_completion_logprobs_are_those_of_the_sampled_tokens(server, local):
    out = server.client().completions.create(model="tiny", prompt="ab", max_tokens=6, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value == pytest.approx(max(top.values())) and top[token] == pytest.approx(value)  # greedy: the top one


def test_concurrent_requests_of_different_lengths_each_get_their_own_text(server, local):
    prompts = ["the cat", "a", "hello there", "zz", "once upon a time", "b", "more", "x"]
    lengths = [30, 3, 12, 25, 7, 18, 1, 40]
    results: dict[int, str] = {}
    finished: list[int] = []

    def ask(i):
        out = server.client().completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i],
                                                 temperature=0)
        results[i] = out.choices[0].text
        finished.append(i)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(len(prompts)))
    for i, text in results.items():
        assert text == _reference(local, prompts[i], lengths[i], temperature=0), prompts[i]


def test_a_short_request_does_not_wait_for_a_long_one(slow_server):
    server = slow_server
    order: list[str] = []

    def long():
        for _ in server.client().completions.create(model="slow", prompt="a", max_tokens=600, stream=True):
            pass
        order.append("long")

    t = threading.Thread(target=long)
    t.start()
    while _health(server)["running"] == 0:
        time.sleep(0.005)
    server.client().completions.create(model="slow", prompt="b", max_tokens=2)
    order.append("short")
    t.join(60)
    assert order == ["short", "long"]


@pytest.mark.parametrize("body, status, param, says", [
    ({"model": "tiny", "prompt": "a", "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 0"),
    ({"model": "tiny", "prompt": "a", "n": 17}, 400, "n", "less than or equal to 16"),
    ({"model": "tiny", "prompt": "a", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ({"model": "tiny", "prompt": "a", "max_token": 5}, 422, "max_token", "unknown field 'max_token'"),
    ({"model": "tiny", "prompt": 5}, 422, "prompt", "prompt"),
    ({"model": "tiny"}, 422, "prompt", "prompt is required"),
    ({"model": "tiny", "prompt": "a" * 65, "max_tokens": 10}, 400, "prompt", "maximum context length is 64"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt", "empty"),
    ({"model": "tiny", "prompt": "a", "stop": ["", "x"]}, 400, "stop", "non-empty"),
    ({"model": "tiny", "prompt": [[1, 2], [999]]}, 400, "prompt", "token id 999"),
    ({"model": "tiny", "prompt": "a", "presence_penalty": 1}, 400, None, "presence_penalty=1.0 is not supported"),
    ({"model": "gpt-4", "prompt": "a"}, 404, "model", "'gpt-4' does not exist"),
])
def test_bad_requests_get_openai_error_bodies(server, body, status, param, says):
    response = _http("POST", f"{server.url}/v1/completions", body, key=KEY)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["type"] and (param is None or error["param"] == param), error


def test_malformed_json_and_keys(server):
    response = _http("POST", f"{server.url}/v1/completions", b'{"model": "tiny", "prompt": ', key=KEY)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError, match="API key is wrong"):
        server.client("wrong").completions.create(model="tiny", prompt="a", max_tokens=1)
    response = _http("GET", f"{server.url}/v1/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="other", prompt="a", max_tokens=1)


def test_a_client_that_disconnects_mid_stream_frees_its_row(slow_server):
    server = slow_server
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/completions", json.dumps({"model": "slow", "prompt": "a", "max_tokens": 1000,
                                                             "stream": True}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.readline().startswith(b"data: ")  # the first token came
    assert _health(server)["running"] == 1
    connection.close()  # the client goes away mid-stream
    deadline = time.time() + 10
    while _health(server)["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert _health(server)["running"] == 0


def test_fine_tuned_defaults_a_full_queue_and_sigterm_with_requests_in_flight(tmp_path):
    # A fine-tuned completion folder: its separator and stop apply to prompts by default.
    meta = FinetuneMeta("completion", separator=" ->", stop="\n")
    folder = _model_folder(tmp_path / "ft", meta, slow=True)
    local = GPT.from_pretrained(folder).eval(), load_tokenizer(folder)
    server = Server(folder, "--max-batch", "1", "--max-queue", "1")
    try:
        client = server.client()
        out = client.completions.create(model="ft", prompt="the cat", max_tokens=30, temperature=0)
        assert out.choices[0].text == _reference(local, "the cat ->", 30, temperature=0, stop=["\n"])
        # One row decodes and one request may wait: of several sent at once some get 429.
        codes: list[int] = []

        def ask():
            r = _http("POST", f"{server.url}/v1/completions", {"model": "ft", "prompt": "a", "max_tokens": 200})
            codes.append(r.status_code)

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
        # SIGTERM while a stream is running: it still gets every token, then the server exits 0.
        got: dict = {}

        def stream():
            pieces = []
            for chunk in client.completions.create(model="ft", prompt="x", max_tokens=800, temperature=0,
                                                   stream=True, stop=["never"]):
                pieces.append(chunk.choices[0])
            got["text"] = "".join(c.text for c in pieces)
            got["finish"] = pieces[-1].finish_reason

        t = threading.Thread(target=stream)
        t.start()
        while _health(server)["running"] == 0:
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        assert "text" not in got  # still streaming when the signal came
        t.join(120)
        assert server.proc.wait(60) == 0
        assert got["finish"] == "length"
        assert got["text"] == _reference(local, "x ->", 800, temperature=0, stop=["never"])
        with pytest.raises(openai.APIConnectionError):
            client.completions.create(model="ft", prompt="a", max_tokens=1)
    finally:
        server.close()


def test_text_the_tokenizer_cannot_encode_is_a_400_naming_the_character(server):
    response = _http("POST", f"{server.url}/v1/completions", {"model": "tiny", "prompt": "ROMEO:"}, key=KEY)
    assert response.status_code == 400, response.text
    assert "character 'R' is not in this tokenizer's alphabet" in response.json()["error"]["message"]
    response = _http("POST", f"{server.url}/v1/inspect", {"model": "tiny", "prompt": "ROMEO:"}, key=KEY)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_a_streamed_echo_comes_alone_in_the_first_chunk(server):
    raw = _http("POST", f"{server.url}/v1/completions", {"model": "tiny", "prompt": "the cat", "max_tokens": 5,
                                                          "stream": True, "echo": True, "logprobs": 1}, key=KEY).text
    chunks = [json.loads(e.removeprefix("data: ")) for e in raw.split("\n\n") if e and e != "data: [DONE]"]
    first = chunks[0]["choices"][0]
    assert first["text"] == "the cat" and first["logprobs"]["tokens"] == list("the cat")
    assert "".join(c["choices"][0]["text"] for c in chunks[1:]) and "_echo" not in raw


def test_a_seed_out_of_range_and_a_null_field(server, local):
    response = _http("POST", f"{server.url}/v1/completions", {"model": "tiny", "prompt": "a", "seed": 2**64}, key=KEY)
    assert response.status_code == 400 and response.json()["error"]["param"] == "seed"
    out = _http("POST", f"{server.url}/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 4,
                                                          "temperature": 0, "n": None, "echo": None}, key=KEY)
    assert out.status_code == 200 and out.json()["choices"][0]["text"] == _reference(local, "a", 4, temperature=0)


def test_unknown_routes_and_the_max_tokens_limit_get_openai_error_bodies(server):
    response = _http("GET", f"{server.url}/v1/nothing", key=KEY)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
    response = _http("POST", f"{server.url}/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 5000},
                     key=KEY)
    assert response.status_code == 400 and "--max-tokens-limit" in response.json()["error"]["message"]


def test_a_non_streaming_client_that_disconnects_frees_its_row(slow_server):
    server = slow_server
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/completions", json.dumps({"model": "slow", "prompt": "a", "max_tokens": 3000}),
                       {"Content-Type": "application/json"})
    deadline = time.time() + 10
    while _health(server)["running"] == 0 and time.time() < deadline:
        time.sleep(0.01)
    assert _health(server)["running"] == 1
    connection.close()  # gone before the answer: tokens keep coming, the row must still go
    deadline = time.time() + 10
    while _health(server)["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert _health(server)["running"] == 0

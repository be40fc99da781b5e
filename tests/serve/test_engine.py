"""The continuous-batching engine against `minigpt.generate`: the same tokens for the same
prompt and settings, whatever else is in the batch and whenever a request joins it."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minigpt import GPT, GPTConfig
from minigpt.generate import generate, generate_text
from minigpt.serve.engine import Engine, Sampling, Sequence
from minigpt.tokenizer import CharTokenizer
from tests.helpers import randomize_

CHARS = "\n abcdefghijklmnopqrstuvwxyz.,!?"
TOKENIZER = CharTokenizer(CHARS)


def _model(block_size: int = 48, pattern=("dense", "banded"), window: int = 6) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=len(CHARS), block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                       attention_pattern=pattern, attention_window=window)
    return randomize_(GPT(config), std=0.5).eval()


class Collector:
    """A Sequence's events, gathered; `wait()` returns once it is done."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.done = threading.Event()

    def __call__(self, event: tuple) -> None:
        self.events.append(event)
        if event[0] in ("done", "error"):
            self.done.set()

    def wait(self, timeout: float = 60) -> "Collector":
        assert self.done.wait(timeout), f"no end after {timeout} s: {self.events[-3:]}"
        return self

    @property
    def tokens(self) -> list[int]:
        return [e[1].id for e in self.events if e[0] == "token"]

    @property
    def text(self) -> str:
        return "".join(e[2] for e in self.events if e[0] == "token")

    @property
    def finish(self) -> str:
        return self.events[-1][1]


def _run(engine: Engine, prompts: list[str], samplings: list[Sampling], stagger: list[int] | None = None):
    """Submit each prompt (the i-th after `stagger[i]` decoding steps); return their collectors."""
    collectors = []
    for i, (prompt, sampling) in enumerate(zip(prompts, samplings)):
        if stagger:
            while engine.steps < stagger[i]:
                threading.Event().wait(0.001)
        c = Collector()
        engine.submit(Sequence(TOKENIZER.encode(prompt), sampling, c))
        collectors.append(c)
    return [c.wait() for c in collectors]


@pytest.fixture
def engine():
    e = Engine(_model(), TOKENIZER, max_batch=4).start()
    yield e
    e.stop(timeout=10)


PROMPTS = ["the cat", "a", "hello there, friend", "zz", "the quick brown fox.", "ok"]


def test_greedy_completions_equal_generate_for_a_mixed_batch(engine):
    lengths = [20, 5, 12, 30, 1, 9]
    got = _run(engine, PROMPTS, [Sampling(max_tokens=n, temperature=0) for n in lengths])
    for prompt, n, c in zip(PROMPTS, lengths, got):
        want = generate(engine.model, TOKENIZER.encode(prompt), n, temperature=0, vocab_limit=TOKENIZER.vocab_size)[0]
        assert c.tokens == want, prompt
        assert c.finish == "length" and c.text == TOKENIZER.decode(want)


def test_requests_that_join_a_running_batch_get_the_same_tokens(engine):
    # Later requests join while earlier ones decode: longer and shorter prompts than the
    # batch's clock, so both the new row and the batch get shifted.
    lengths = [25, 18, 6, 22, 10, 14]
    got = _run(engine, PROMPTS, [Sampling(max_tokens=n, temperature=0) for n in lengths],
               stagger=[0, 2, 3, 5, 9, 11])
    for prompt, n, c in zip(PROMPTS, lengths, got):
        want = generate(engine.model, TOKENIZER.encode(prompt), n, temperature=0, vocab_limit=TOKENIZER.vocab_size)[0]
        assert c.tokens == want, prompt


def test_a_seeded_sample_is_the_same_alone_and_in_a_batch(engine):
    s = Sampling(max_tokens=15, temperature=1.0, top_k=10, seed=1234)
    alone = _run(engine, ["the cat"], [s])[0].tokens
    crowd = _run(engine, ["zz", "the cat", "hello there"], [Sampling(max_tokens=20, temperature=0.7, seed=9), s,
                                                              Sampling(max_tokens=7, temperature=1.3, seed=3)])
    assert crowd[1].tokens == alone
    want = generate(engine.model, TOKENIZER.encode("the cat"), 15, temperature=1.0, top_k=10, seed=1234,
                    vocab_limit=TOKENIZER.vocab_size)[0]
    assert alone == want


def test_stop_strings_end_the_text_as_generate_text_cuts_it(engine):
    prompt, stop = "hello there, friend", ("e", "th")
    c = _run(engine, [prompt], [Sampling(max_tokens=25, temperature=0, stop=stop)])[0]
    want = generate_text(engine.model, TOKENIZER, prompt, 25, temperature=0, stop=list(stop))[0]
    assert c.text == want and c.finish in ("stop", "length")


def test_echo_reports_the_prompts_logprobs_against_a_full_forward(engine):
    prompt = TOKENIZER.encode("the quick brown fox.")
    c = Collector()
    engine.submit(Sequence(prompt, Sampling(max_tokens=0, echo=True, logprobs=3), c))
    c.wait()
    (kind, infos), done = c.events
    assert kind == "prompt" and done == ("done", "length") and [t.id for t in infos] == prompt
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(torch.tensor([prompt])).logits[0].double(), dim=-1)
    assert infos[0].logprob is None
    for i, info in enumerate(infos[1:]):
        assert info.logprob == pytest.approx(float(logp[i, prompt[i + 1]]), abs=1e-5)
        assert len(info.top) == 3 and max(info.top.values()) == pytest.approx(float(logp[i].max()), abs=1e-5)


@given(window=st.integers(1, 9), block=st.integers(24, 40), seed=st.integers(0, 1000), past=st.integers(0, 12))
def test_rows_past_the_ring_and_the_context_match_generate(window, block, seed, past):
    # A small context makes the batch's clock reach block_size, so it is shifted left over
    # the padding every row has; a small window makes the banded ring wrap; `past` tokens
    # beyond the context make rows slide on their last block_size tokens, as generate does.
    model = _model(block_size=block, window=window)
    engine = Engine(model, TOKENIZER, max_batch=3).start()
    try:
        g = torch.Generator().manual_seed(seed)
        prompts = ["".join(CHARS[int(i)] for i in torch.randint(1, len(CHARS), (int(n),), generator=g))
                   for n in torch.randint(1, 12, (5,), generator=g)]
        lengths = [block - len(p) + past * (i % 2) for i, p in enumerate(prompts)]  # fill it, or go past it
        got = _run(engine, prompts, [Sampling(max_tokens=n, temperature=0) for n in lengths], stagger=[0, 1, 4, 7, 9])
    finally:
        engine.stop(timeout=10)
    for prompt, n, c in zip(prompts, lengths, got):
        want = generate(model, TOKENIZER.encode(prompt), n, temperature=0, vocab_limit=TOKENIZER.vocab_size)[0]
        assert c.tokens == want, (prompt, window, block)


def test_a_cancelled_sequence_leaves_the_batch(engine):
    c = Collector()
    seq = Sequence(TOKENIZER.encode("the cat"), Sampling(max_tokens=40, temperature=0), None)

    def deliver(event):  # the client goes away after its third token, as the engine delivers it
        c(event)
        if len(c.tokens) == 3:
            seq.cancel()

    seq.deliver = deliver
    engine.submit(seq)
    other = _run(engine, ["a"], [Sampling(max_tokens=5, temperature=0)])[0]
    assert other.finish == "length" and len(c.tokens) == 3 and not c.done.is_set()
    deadline = time.time() + 10
    while engine.busy_rows and time.time() < deadline:
        time.sleep(0.01)
    assert engine.busy_rows == 0


def test_prompts_that_do_not_fit_the_context_are_refused_at_submit(engine):
    with pytest.raises(ValueError, match="must have 1 to 48"):
        engine.submit(Sequence(TOKENIZER.encode("a" * 49), Sampling(max_tokens=1), Collector()))


class _WithEos:
    """The character tokenizer with one of its characters taken as end-of-text."""

    def __init__(self, eos: str) -> None:
        self.eos_id = TOKENIZER.encode(eos)[0]
        self.vocab_size = TOKENIZER.vocab_size
        self.encode, self.decode = TOKENIZER.encode, TOKENIZER.decode


def test_end_of_text_is_a_token_and_the_held_back_text_still_comes():
    model = _model()
    prompt = TOKENIZER.encode("the cat")
    free = generate(model, prompt, 30, temperature=0, vocab_limit=TOKENIZER.vocab_size)[0]
    eos = TOKENIZER.decode([free[6]])  # the model's 7th greedy token becomes end-of-text
    tokenizer = _WithEos(eos)
    engine = Engine(model, tokenizer, max_batch=2).start()
    try:
        c = Collector()  # a stop string longer than the text holds all of it back until the end
        engine.submit(Sequence(prompt, Sampling(max_tokens=30, temperature=0, stop=("QQQQQQQQ",)), c))
        c.wait()
    finally:
        engine.stop(10)
    want = generate(model, prompt, 30, temperature=0, eos_id=tokenizer.eos_id, vocab_limit=TOKENIZER.vocab_size)[0]
    assert c.tokens == want + [tokenizer.eos_id] and c.finish == "stop"
    assert c.text == TOKENIZER.decode(want)


def test_a_request_that_fails_at_its_prompt_ends_alone(engine):
    bad, good = Collector(), Collector()
    engine.submit(Sequence([len(CHARS) + 5], Sampling(max_tokens=5), bad))  # an id past the model's vocabulary
    engine.submit(Sequence(TOKENIZER.encode("the cat"), Sampling(max_tokens=5, temperature=0), good))
    bad.wait()
    assert bad.events[-1][0] == "error" and "out of range" in bad.events[-1][1]
    assert good.wait().finish == "length" and len(good.tokens) == 5


def test_calls_between_steps_leave_no_phantom_requests_in_the_queue(engine):
    c = Collector()
    engine.submit(Sequence(TOKENIZER.encode("a"), Sampling(max_tokens=40, temperature=0), c))
    results = [engine.call(lambda i=i: i * i).result(timeout=10) for i in range(5)]
    assert results == [0, 1, 4, 9, 16]
    c.wait()
    assert engine.waiting == 0

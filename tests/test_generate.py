import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minigpt import GPT, GPTConfig, Tokenizer, generate_text, stream_text
from minigpt.generate import generate, sample_next
from tests.helpers import randomize_, use_tiktoken_cache


def model_for(window=4, block=32, vocab=53):
    config = GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=16,
                       attention_pattern=("dense", "banded"), attention_window=window)
    return randomize_(GPT(config), seed=1).eval()


@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    new=st.integers(1, 40),
    window=st.integers(1, 6),
)
def test_greedy_output_identical_with_and_without_cache(lengths, new, window):
    # new up to 40 with block 32 also crosses the context limit (the loop slides).
    model = model_for(window)
    g = torch.Generator().manual_seed(sum(lengths))
    prompts = [torch.randint(0, 53, (n,), generator=g).tolist() for n in lengths]
    cached = model.generate(prompts, new, temperature=0, use_cache=True)
    uncached = model.generate(prompts, new, temperature=0, use_cache=False)
    assert cached == uncached


def test_batched_prompts_of_different_lengths_equal_one_at_a_time():
    model = model_for()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11]]
    batched = model.generate(prompts, 15, temperature=0)
    assert batched == [model.generate([p], 15, temperature=0)[0] for p in prompts]


def _greedy_by_full_forward(model, prompt, new):
    """Greedy decoding the slow way: the whole sequence through `forward` every step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_decoding_follows_every_change_of_the_weights():
    model = model_for(block=64)
    prompt = [3, 1, 4, 1, 5]
    first = model.generate(prompt, 12, temperature=0)[0]
    assert first == _greedy_by_full_forward(model, prompt, 12)
    assert model.generate(prompt, 12, temperature=0)[0] == first  # nothing stale is kept between calls
    with torch.no_grad():  # in place, as an optimizer step does (the head is tied to tok_emb)
        model.lm_head.weight.mul_(-1.5)
    changed = model.generate(prompt, 12, temperature=0)[0]
    assert changed == _greedy_by_full_forward(model, prompt, 12) and changed != first
    model.load_state_dict(model_for(block=64).state_dict())  # copied in: back to the first weights
    assert model.generate(prompt, 12, temperature=0)[0] == first
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * -1.5)  # a new (untied) tensor
    assert model.generate(prompt, 12, temperature=0)[0] == _greedy_by_full_forward(model, prompt, 12)
    model.to(torch.bfloat16).to(torch.float32)  # may land on the same storage, same version
    assert model.generate(prompt, 12, temperature=0)[0] == _greedy_by_full_forward(model, prompt, 12)
    copied = copy.deepcopy(model)
    assert copied.generate(prompt, 12, temperature=0)[0] == _greedy_by_full_forward(model, prompt, 12)
    with torch.inference_mode():  # tensors without a version counter
        frozen = model_for(block=64)
    assert frozen.generate(prompt, 12, temperature=0)[0] == first


def test_sampling_is_reproducible_for_a_seed():
    model = model_for()
    a = model.generate([[1, 2]], 20, temperature=1.0, seed=7)
    b = model.generate([[1, 2]], 20, temperature=1.0, seed=7)
    c = model.generate([[1, 2]], 20, temperature=1.0, seed=8)
    assert a == b and a != c


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]])
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        assert sample_next(logits, top_k=2, generator=g).item() in (1, 2)
        g = torch.Generator().manual_seed(seed)
        assert sample_next(logits, top_p=0.4, generator=g).item() == 1  # p(1) ~ 0.5 >= 0.4
    assert sample_next(logits, temperature=0).item() == 1


def test_generation_stops_at_eos():
    model = model_for()
    free = model.generate([[1, 2, 3]], 20, temperature=0)[0]
    eos = free[4]
    stopped = model.generate([[1, 2, 3]], 20, temperature=0, eos_id=eos)[0]
    assert stopped == free[: free.index(eos)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1), "temperature=-1"),
        (dict(top_k=0), "top_k=0"),
        (dict(top_p=1.5), "top_p=1.5"),
    ],
)
def test_bad_sampling_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        model_for().generate([[1]], 3, **kwargs)


def test_prompt_longer_than_context_is_a_clear_error():
    with pytest.raises(ValueError, match="prompt 0 has 33 tokens, more than block_size=32"):
        model_for().generate([list(range(33))], 3)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model_for().generate([[1], []], 3)


def test_stop_strings_and_streaming_agree(monkeypatch):
    use_tiktoken_cache(monkeypatch)
    tok = Tokenizer()
    config = GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=16)
    model = randomize_(GPT(config), seed=3).eval()
    full = generate_text(model, tok, "Hello", 30, temperature=0)[0]
    assert len(full) > 5
    stop = full[3:6]
    cut = generate_text(model, tok, "Hello", 30, temperature=0, stop=[stop])[0]
    assert cut == full[: full.find(stop)]
    streamed = "".join(stream_text(model, tok, "Hello", 30, temperature=0, stop=[stop]))
    assert streamed == cut
    assert "".join(stream_text(model, tok, "Hello", 30, temperature=0)) == full


def test_text_helpers_sample_only_ids_the_tokenizer_can_decode():
    """A model with more rows than its tokenizer (the char recipe's 65 trained on text of fewer
    characters) samples among the tokenizer's ids only; token-level generation still sees all."""
    from minigpt.tokenizer import CharTokenizer

    model = model_for(vocab=53)
    tok = CharTokenizer("abcde")
    with torch.no_grad():
        model.lm_head.weight[5:] += 50.0  # make the undecodable rows the likeliest
    texts = generate_text(model, tok, ["ab", "c"], 30, temperature=1.0, seed=0)
    assert all(set(t) <= set("abcde") and len(t) == 30 for t in texts)
    assert set("".join(stream_text(model, tok, "ab", 30, temperature=1.0, seed=0))) <= set("abcde")
    assert max(max(row) for row in model.generate([[0, 1]], 30, temperature=1.0, seed=0)) >= 5


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -0.5])
def test_a_temperature_that_is_not_a_finite_non_negative_number_is_refused(temperature):
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="must be >= 0 and finite"):
        generate(model, [1, 2], 3, temperature=temperature)


@given(text=st.text(alphabet="ab日本語\u00e9 \n", min_size=0, max_size=120), stop=st.sampled_from([(), ("語\n",), ("ab", "é")]))
def test_text_stream_gives_the_whole_decode_cut_at_the_first_stop(text, stop):
    # Byte-level BPE splits the multi-byte characters across tokens; the stream decodes in
    # pieces (a fixed prefix and a tail) and must give exactly what one decode of all ids gives.
    import os

    from minigpt.generate import TextStream, _cut_at_stop
    from tests.helpers import TIKTOKEN_CACHE, need_file

    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(need_file(TIKTOKEN_CACHE)))
    tokenizer = Tokenizer()
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer, stop)
    pieces = []
    for t in ids:
        pieces.append(stream.push(t))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    assert "".join(pieces) == _cut_at_stop(tokenizer.decode(ids), list(stop))[0]

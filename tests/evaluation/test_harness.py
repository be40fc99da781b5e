"""The evaluation harness: exact log-likelihoods, scoring rules computed by hand, K-shot
prompts, the cached path against its slow twin, and a trained model above chance."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt import GPT, CharTokenizer, GPTConfig
from minigpt.cli import main
from minigpt.evaluation import MultipleChoice, PromptFormat, Task, evaluate_examples, read_task
from minigpt.evaluation.prompts import build_prompts
from minigpt.evaluation.scoring import score_continuations
from minigpt.tokenizer import save_tokenizer
from tests.helpers import randomize_

transformers = pytest.importorskip("transformers")

LOGPROB_ATOL = 1e-4  # float32, as the issue states
ALPHABET = "abcdefghijklmnopqrstuvwxyzA :?\n"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hf_model(family):
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                         resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.GPTNeoConfig(vocab_size=97, max_position_embeddings=64, hidden_size=32, num_layers=2,
                                           num_heads=4, attention_types=[[["global", "local"], 1]], window_size=5,
                                           embed_dropout=0, attention_dropout=0, resid_dropout=0)
        model = transformers.GPTNeoForCausalLM(config)
    return randomize_(model, 0, std=0.2).eval()


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("family", ["gpt2", "gpt_neo"])
def test_choice_loglikelihoods_match_transformers(family, backend, tmp_path):
    hf = hf_model(family)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path, backend=backend)
    tokenizer = CharTokenizer(ALPHABET)
    examples = [MultipleChoice("the cat sat on the", ("mat", "hat", "big red rug"), 0),
                MultipleChoice("where is it?", ("here", "there"), 1),
                MultipleChoice("a b c d e f g h i j k", ("l", "m n", "zz", "q"), 3)]
    result = evaluate_examples(model, tokenizer, Task("t", "multiple_choice", tuple(examples)), shots=1,
                               batch_size=2)
    for record in result.examples:
        ctx = tokenizer.encode(record["prompt"])
        for choice, got, got_uncond in zip(record["choices"], record["loglikelihoods"],
                                           record["unconditional_loglikelihoods"]):
            for prefix, value in ((ctx, got), (tokenizer.encode("Answer:"), got_uncond)):
                cont = tokenizer.encode(" " + choice)
                with torch.no_grad():
                    logp = torch.log_softmax(hf(torch.tensor([prefix + cont])).logits[0], dim=-1)
                expected = sum(logp[len(prefix) - 1 + j, t].item() for j, t in enumerate(cont))
                assert value == pytest.approx(expected, abs=LOGPROB_ATOL)


def uniform_model(vocab_size):
    """Every next token has probability 1/V: a choice of n tokens scores -n log V."""
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=8))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def test_acc_and_acc_norm_equal_hand_computed_values(tmp_path):
    # Char tokens under a uniform model: ll(" " + choice) = -(len(choice) + 1) log V. acc picks the
    # shortest choice; acc_norm divides by len(choice) without the delimiter, -(1 + 1/len) log V,
    # so it picks the longest; acc_uncond's ratio is 1 for every choice: the tie goes to choice 0.
    rows = [{"context": "q", "choices": ["a", "bb", "ccc"], "label": 0},
            {"context": "q", "choices": ["aa", "b"], "label": 1},
            {"context": "q", "choices": ["aaa", "b", "cc"], "label": 0},
            {"context": "q", "choices": ["a", "bbbb"], "label": 1},
            {"context": "q", "choices": ["ab", "c", "dddd"], "label": 2}]
    task = read_task(write_jsonl(tmp_path / "five.jsonl", rows))
    tokenizer = CharTokenizer(ALPHABET)
    result = evaluate_examples(uniform_model(len(ALPHABET)), tokenizer, task)
    shortest, longest, first = [1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 0, 0]
    for name, hits in (("acc", shortest), ("acc_norm", longest), ("acc_uncond", first)):
        p = sum(hits) / 5
        assert result.metrics[name] == pytest.approx(p)
        assert result.stderr[name] == pytest.approx(math.sqrt(p * (1 - p) / 4))  # sample std / sqrt(n)
    log_v = math.log(len(ALPHABET))
    assert result.examples[0]["loglikelihoods"] == pytest.approx([-2 * log_v, -3 * log_v, -4 * log_v], abs=1e-5)


def mc_examples(n):
    return [MultipleChoice(f"question {i}", (f"yes {i}", f"no {i}"), i % 2, i + 1) for i in range(n)]


def test_k_shot_prompts_never_include_the_scored_example_and_repeat_with_the_seed():
    examples = mc_examples(6)
    fmt = PromptFormat()
    prompts = build_prompts(examples, 5, seed=3, fmt=fmt)  # every other example: only one way to draw
    for e, prompt in zip(examples, prompts):
        demos, query = prompt.rsplit(fmt.separator, 1)[0], prompt.rsplit(fmt.separator, 1)[1]
        assert query == e.context and fmt.demonstration(e) not in demos
        assert len(demos.split(fmt.separator)) == 5
    assert build_prompts(examples, 2, seed=3, fmt=fmt) == build_prompts(examples, 2, seed=3, fmt=fmt)
    assert build_prompts(examples, 2, seed=3, fmt=fmt) != build_prompts(examples, 2, seed=4, fmt=fmt)
    # A separate demonstrations file that contains the scored example: it is left out too.
    pool = mc_examples(3)
    for e, prompt in zip(pool, build_prompts(pool, 2, seed=0, fmt=fmt, demos=pool[::-1])):
        assert fmt.demonstration(e) not in prompt
    with pytest.raises(ValueError, match="only 5 other examples"):
        build_prompts(examples, 6, seed=0, fmt=fmt)


@settings(max_examples=15, deadline=None)
@given(data=st.data(), batch_size=st.integers(1, 5), banded=st.booleans())
def test_cached_context_path_equals_uncached(data, batch_size, banded):
    torch.manual_seed(0)
    kinds = ("dense", "banded") if banded else ("dense",)
    model = GPT(GPTConfig(vocab_size=23, block_size=24, n_layer=2, n_head=2, n_embd=16, attention_pattern=kinds,
                          attention_window=4))
    token = st.integers(0, 22)
    requests = data.draw(st.lists(st.tuples(st.lists(token, min_size=1, max_size=30),
                                            st.lists(st.lists(token, min_size=1, max_size=6), min_size=1, max_size=4)),
                                  min_size=1, max_size=6))
    cached = score_continuations(model, requests, batch_size=batch_size)
    plain = score_continuations(model, requests, batch_size=batch_size, use_cache=False)
    for a, b in zip(cached, plain):
        for x, y in zip(a, b):
            assert x.greedy == y.greedy or max(map(abs, x.logprobs)) < 1e-3
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ a model that learned
PATTERN = "the cat sat on a mat\n"


@pytest.fixture(scope="module")
def pattern_model():
    """A tiny char model trained for a few seconds on one repeated line."""
    torch.manual_seed(0)
    tokenizer = CharTokenizer(ALPHABET)
    model = GPT(GPTConfig(vocab_size=len(ALPHABET), block_size=32, n_layer=1, n_head=2, n_embd=32))
    data = torch.tensor(tokenizer.encode(PATTERN * 20))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(120):
        starts = torch.randint(0, len(data) - 33, (16,))
        batch = torch.stack([data[s : s + 33] for s in starts.tolist()])
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tokenizer


def pattern_tasks(tmp_path):
    text = PATTERN * 3
    words = [i for i, ch in enumerate(text) if ch == " "]
    mc, cloze, free = [], [], []
    for n, cut in enumerate(range(5, 45, 2)):
        truth = text[cut : cut + 4]
        wrong = [text[cut + 5 : cut + 9], "zzqz", text[cut + 1 : cut + 5][::-1]]
        choices = [truth, *wrong] if truth not in wrong else [truth, "qqqq", "zzzz", "xxxx"]
        label = n % 4
        choices[0], choices[label] = choices[label], choices[0]
        mc.append({"context": text[:cut], "choices": choices, "label": label})
    for end in words[3:15]:
        cloze.append({"text": text[:end].replace("\n", " ")[-25:]})
    for cut in range(len(PATTERN) + 6, 2 * len(PATTERN) - 2):  # the rest of the line, 1 to 14 characters
        free.append({"prompt": text[cut - 12 : cut], "completion": text[cut:].split("\n")[0]})
    return (write_jsonl(tmp_path / "mc.jsonl", mc), write_jsonl(tmp_path / "cloze.jsonl", cloze),
            write_jsonl(tmp_path / "free.jsonl", free))


def test_trained_model_beats_chance_on_every_task_type(pattern_model, tmp_path):
    model, tokenizer = pattern_model
    fmt = PromptFormat(target_delimiter="")
    mc, cloze, free = (read_task(p) for p in pattern_tasks(tmp_path))
    assert evaluate_examples(model, tokenizer, mc, fmt=fmt).metrics["acc"] >= 0.9  # chance: 0.25
    assert evaluate_examples(model, tokenizer, cloze, shots=1).metrics["acc"] >= 0.8
    free_result = evaluate_examples(model, tokenizer, free)
    assert free_result.metrics["exact_match"] >= 0.6 and free_result.metrics["f1"] >= 0.8  # chance: ~0


def test_eval_cli_writes_results_for_three_task_types(pattern_model, tmp_path, capsys):
    model, tokenizer = pattern_model
    model.save_pretrained(tmp_path / "lm")
    save_tokenizer(tokenizer, tmp_path / "lm")
    files = [str(p) for p in pattern_tasks(tmp_path)]
    main(["eval", *files, "--model", str(tmp_path / "lm"), "--shots", "1", "--limit", "6", "--out",
          str(tmp_path / "out"), "--target-delimiter", ""])
    out = capsys.readouterr().out
    assert "acc_norm" in out and "exact_match" in out and "perplexity" in out
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["task"] for r in summary["results"]] == ["mc", "cloze", "free"]
    assert all(r["n"] == 6 for r in summary["results"])
    records = [json.loads(line) for line in (tmp_path / "out" / "examples.jsonl").read_text().splitlines()]
    assert len(records) == 18 and len(records[0]["loglikelihoods"]) == 4
    assert (tmp_path / "out" / "results.md").read_text().startswith("| task |")


@pytest.mark.parametrize("row, message", [
    ('{"context": "c", "choices": ["a", "b"], "label": 2}', "line 2: field 'label' must be the index"),
    ('{"context": "c", "choices": "ab", "label": 0}', "line 2: field 'choices' must be a list"),
    ('{"context": "c", "label": 0}', r"line 2: a multiple-choice row needs .*\['choices'\] missing"),
    ('{"prompt": "p", "completion": "c"}', "line 2: a free_form row in a multiple_choice file"),
    ('{"question": "q"}', "line 2: cannot tell the task type"),
    ('{"context": ', "line 2: not valid JSON"),
])
def test_malformed_task_files_name_the_line_and_field(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "c", "choices": ["a", "b"], "label": 0}\n' + row + "\n")
    with pytest.raises(ValueError, match=message):
        read_task(path)


def test_hellaswag_rows_are_read_as_is(tmp_path):
    row = {"ind": 4, "activity_label": "x", "ctx": "A man is", "endings": ["a", "b", "c", "d"], "label": "2"}
    (example,) = read_task(write_jsonl(tmp_path / "hs.jsonl", [row])).examples
    assert example == MultipleChoice("A man is", ("a", "b", "c", "d"), 2, 1)


def test_cache_truncate_refuses_a_wrapped_banded_ring():
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=8,
                          attention_pattern=("dense", "banded"), attention_window=3))
    cache = model.new_cache(1)
    with torch.no_grad():
        model.hidden(torch.tensor([[1, 2]]), cache=cache)
        cache.truncate(1)  # two tokens fit in the ring of three: nothing was overwritten
        model.hidden(torch.tensor([[3, 4, 5]]), cache=cache)
    with pytest.raises(ValueError, match="has wrapped"):
        cache.truncate(2)


def test_a_long_context_is_cut_for_each_choice_as_lm_evaluation_harness_cuts_it():
    # The harness feeds (context + continuation)[-(block_size + 1):][:-1]: a choice of n tokens
    # sees the last block_size + 1 - n context tokens, so choices of different lengths see
    # different contexts.
    torch.manual_seed(0)
    model = randomize_(GPT(GPTConfig(vocab_size=23, block_size=8, n_layer=2, n_head=2, n_embd=16)), 0, 0.5).eval()
    context, choices = list(range(1, 15)), [[3], [4, 5, 6], [7] * 8]
    (scored,) = score_continuations(model, [(context, choices)])
    for choice, got in zip(choices, scored):
        inp = (context + choice)[-(8 + 1):][:-1]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inp])).logits[0], dim=-1)
        n = len(choice)
        expected = [logp[len(inp) - n + j, t].item() for j, t in enumerate(choice)]
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(expected), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="leaves no room"):
        score_continuations(model, [(context, [[1] * 9])])


def test_trailing_whitespace_of_a_context_moves_into_the_continuation():
    from minigpt.evaluation.harness import encode_pair

    class Words:  # a word-level tokenizer where " yes" and " " + "yes" differ, as in GPT-2's BPE
        vocab = {"Answer:": 0, " yes": 1, " ": 2, "yes": 3, "\n": 4, "\n yes": 5}
        eos_id = 9

        def encode(self, text):
            ids = []
            while text:
                piece = max((p for p in self.vocab if text.startswith(p)), key=len)
                ids.append(self.vocab[piece])
                text = text[len(piece):]
            return ids

    words = Words()
    assert encode_pair(words, "Answer: ", "yes") == ([0], [1])  # not [0, 2] and [3]
    assert encode_pair(words, "Answer:", " yes") == ([0], [1])
    assert encode_pair(words, "Answer:\n", " yes") == ([0], [5])
    assert encode_pair(words, "", " yes") == ([9], [1])  # an empty context is end-of-text


def test_fewshot_file_gives_its_first_k_rows_in_order_and_refuses_what_it_cannot_do(tmp_path):
    from minigpt.evaluation.harness import _first_demonstrations

    demos = write_jsonl(tmp_path / "demos.jsonl", [{"context": f"q{i}", "choices": ["a", "b"], "label": i % 2}
                                                     for i in range(3)])
    assert [d.context for d in _first_demonstrations(demos, 2, None)] == ["q0", "q1"]
    with pytest.raises(ValueError, match="use one"):
        _first_demonstrations(demos, 2, demos)
    with pytest.raises(ValueError, match="give --shots K"):
        _first_demonstrations(demos, 0, None)
    with pytest.raises(ValueError, match="holds 3 examples, fewer than --shots 4"):
        _first_demonstrations(demos, 4, None)

import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.finetune.classify import LabeledText
from minigpt.finetune.fewshot import FewShotClassifier, FewShotPrompt, continuation_logprobs, select_shots
from tests.finetune.common import bigram_gpt
from tests.helpers import use_tiktoken_cache


def test_fewshot_picks_the_unambiguous_label(monkeypatch):
    use_tiktoken_cache(monkeypatch)
    from minigpt import Tokenizer

    tok = Tokenizer()
    model = bigram_gpt([(" great", " positive"), (" terrible", " negative")], tok)
    shots = [LabeledText("a dull, terrible", "negative", 1), LabeledText("so great", "positive", 2),
             LabeledText("awful and terrible", "negative", 3)]
    clf = FewShotClassifier(model, tok, ("negative", "positive"), tuple(shots), FewShotPrompt(template="Review: {text}"))
    assert clf.predict("what a great") == 1
    assert clf.predict("simply terrible") == 0
    scores = clf.scores("what a great")
    assert scores[1] > -0.1 and scores[0] < -10  # near-certain, not a coin flip


def test_continuation_scores_equal_the_full_sequence_log_likelihood():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16))
    prompt = [3, 1, 4, 1, 5]
    continuations = [[9], [2, 6, 5], [8, 7]]
    got = continuation_logprobs(model, prompt, continuations)
    for c, lp in zip(continuations, got):
        seq = torch.tensor([prompt + c])
        logp = torch.log_softmax(model(seq).logits[0], dim=-1)
        expected = [logp[len(prompt) - 1 + j, c[j]].item() for j in range(len(c))]
        assert lp == pytest.approx(expected, abs=1e-5)


def test_shots_are_balanced_and_reproducible():
    rows = [LabeledText(f"t{i}", "a" if i < 20 else "b", i) for i in range(24)]
    shots = select_shots(rows, 4, seed=1)
    assert sorted(s.label for s in shots) == ["a", "a", "b", "b"]
    assert select_shots(rows, 4, seed=1) == shots
    with pytest.raises(ValueError, match="only 24 examples"):
        select_shots(rows, 30)


def test_prompt_renders_shots_then_the_query():
    prompt = FewShotPrompt(verbalizers={"sci_tech": "science"})
    shots = [LabeledText("atoms", "sci_tech", 1), LabeledText("goal!", "sports", 2)]
    assert prompt.render(shots, "rockets") == (
        "Review: atoms\nSentiment: science\n\nReview: goal!\nSentiment: sports\n\nReview: rockets\nSentiment:")
    with pytest.raises(ValueError, match="must contain"):
        FewShotPrompt(template="no slot")

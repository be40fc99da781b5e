import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.finetune.data import LabeledText
from minigpt.finetune.fewshot import FewShotClassifier, FewShotPrompt, continuation_logprobs, select_shots
from tests.helpers import use_tiktoken_cache


def bigram_gpt(pairs, tokenizer, n_embd=16):
    """A real GPT whose blocks add nothing (output projections zero) and whose positions
    are zero, so its next-token logits are LN(e_current) . e_next: a bigram model. Each
    (cue word, label word) pair shares one embedding direction, so after the cue the label
    is far more likely than anything else. Different pairs use orthogonal directions."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=128, n_layer=1, n_head=2, n_embd=n_embd)).eval()
    with torch.no_grad():
        model.pos_emb.weight.zero_()
        for block in model.blocks:
            for linear in (block.attn.proj, block.mlp.proj):
                linear.weight.zero_()
                linear.bias.zero_()
        for i, (cue, label) in enumerate(pairs):
            direction = torch.zeros(n_embd)
            direction[2 * i], direction[2 * i + 1] = 4.0, -4.0  # zero mean: LayerNorm keeps its direction
            for word, scale in ((cue, 1.0), (label, 2.0)):  # the label outscores the cue itself
                (token,) = tokenizer.encode(word)
                model.tok_emb.weight[token] = scale * direction
    return model


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

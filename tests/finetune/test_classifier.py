import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.finetune.classifier import GPTClassifier, balanced_class_weights, classification_loss
from tests.helpers import randomize_

transformers = pytest.importorskip("transformers")


def test_logits_match_gpt2_for_sequence_classification_with_right_padding(tmp_path):
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     num_labels=3, pad_token_id=0, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(0)
    hf = randomize_(transformers.GPT2ForSequenceClassification(config), seed=1, std=0.2).eval()
    lm = transformers.GPT2LMHeadModel(config)
    lm.transformer.load_state_dict(hf.transformer.state_dict())
    lm.save_pretrained(tmp_path)
    model = GPTClassifier(GPT.from_pretrained(tmp_path), num_labels=3).eval()
    with torch.no_grad():
        model.score.weight.copy_(hf.score.weight)
    idx = torch.tensor([[5, 6, 7, 8, 9], [11, 12, 0, 0, 0], [13, 0, 0, 0, 0]])  # 0 pads
    with torch.no_grad():
        expected = hf(idx).logits
        got = model(idx, torch.tensor([5, 2, 1]))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_padding_does_not_change_a_rows_logits():
    torch.manual_seed(0)
    model = GPTClassifier(GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16)), 2).eval()
    alone = model(torch.tensor([[3, 4, 5]]))
    padded = model(torch.tensor([[3, 4, 5, 1, 1, 1]]), torch.tensor([3]))
    torch.testing.assert_close(alone, padded)
    with pytest.raises(ValueError, match="lengths"):
        model(torch.tensor([[3, 4]]), torch.tensor([3]))


def test_class_weights_are_balanced_and_weight_the_loss():
    assert balanced_class_weights([0, 0, 0, 1], 2) == [4 / 6, 4 / 2]
    with pytest.raises(ValueError, match=r"classes \[2\] have no training rows"):
        balanced_class_weights([0, 1], 3)
    torch.manual_seed(0)
    model = GPTClassifier(GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=1, n_embd=8)), 2)
    batch = {"idx": torch.tensor([[1, 2], [3, 4]]), "lengths": torch.tensor([2, 2]), "labels": torch.tensor([0, 1])}
    per_row = torch.nn.functional.cross_entropy(model(batch["idx"]), batch["labels"], reduction="none")
    weighted = classification_loss(model, batch, torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(weighted, (per_row[0] + 3 * per_row[1]) / 4)

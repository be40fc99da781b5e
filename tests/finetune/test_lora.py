import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.finetune.classifier import GPTClassifier
from minigpt.finetune.lora import LoRALinear, apply_lora, freeze_all_but_last, has_lora, merge_lora

CONFIG = GPTConfig(vocab_size=32, block_size=16, n_layer=3, n_head=2, n_embd=16)


def test_lora_starts_at_the_base_model_and_only_adapters_get_gradients():
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    idx = torch.randint(0, 32, (2, 10))
    before = model(idx).logits
    apply_lora(model, rank=2, alpha=4, dropout=0.1)
    torch.testing.assert_close(model.eval()(idx).logits, before)  # B = 0 at the start
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable)
    assert len(trainable) == 2 * 4 * CONFIG.n_layer  # A and B for qkv, proj, fc, proj in each block

    model.train()
    model(idx, idx).loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    # Training through the shared loop changes nothing but the adapters: see
    # tests/train/test_finetune.py::test_lora_finetune_changes_only_adapters_and_exports_merged.


def test_merge_gives_identical_outputs_and_the_original_names(tmp_path):
    torch.manual_seed(0)
    model = GPT(CONFIG)
    apply_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.1)
    model.eval()
    idx = torch.randint(0, 32, (2, 12))
    with torch.no_grad():
        before = model(idx).logits
        merge_lora(model)
        after = model(idx).logits
    assert not has_lora(model)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(GPT(CONFIG).state_dict())
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(GPT.from_pretrained(tmp_path)(idx).logits, before, rtol=1e-5, atol=1e-5)


def test_lora_on_a_classifier_also_trains_its_head():
    model = GPTClassifier(GPT(CONFIG), 3)
    apply_lora(model, rank=2, targets=("attn.qkv",), trainable=("score.",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and len(trainable) == 1 + 2 * CONFIG.n_layer
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        apply_lora(GPT(CONFIG), targets=("attn.q",))


def test_freeze_all_but_last_blocks():
    model = GPTClassifier(GPT(CONFIG), 2)
    freeze_all_but_last(model, 1, trainable=("score.",))
    trainable = {n.split(".")[1] if n.startswith("backbone.") else n.split(".")[0]
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks", "ln_f", "score"}
    assert all(p.requires_grad == n.startswith(("backbone.blocks.2.", "backbone.ln_f.", "score."))
               for n, p in model.named_parameters())
    freeze_all_but_last(model, 0, trainable=("score.",))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["score.weight"]
    with pytest.raises(ValueError, match="nothing left to train"):
        freeze_all_but_last(GPT(CONFIG), 0)

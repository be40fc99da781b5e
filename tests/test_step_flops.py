"""MFU counts the FLOPs a training step does: checked against torch's own FLOP counter."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minigpt import GPT, GPTConfig
from minigpt.counts import flops_per_token, step_flops_per_token
from minigpt.finetune.classifier import GPTClassifier, classification_loss
from minigpt.finetune.lora import apply_lora, freeze_all_but_last
from minigpt.train.observe import model_flops_per_token

CONFIG = GPTConfig(vocab_size=512, block_size=32, n_layer=3, n_head=2, n_embd=64, attention_pattern=("dense",))
B, T = 2, 32


def measured_flops_per_token(model) -> float:
    """Matmul FLOPs of one forward + backward, by torch.utils.flop_counter (math attention)."""
    idx = torch.randint(0, CONFIG.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        if isinstance(model, GPT):
            loss = model(idx, targets=idx).loss
        else:
            loss = classification_loss(model, {"idx": idx, "lengths": torch.full((B,), T),
                                               "labels": torch.zeros(B, dtype=torch.long)})
        loss.backward()
    return counter.get_total_flops() / (B * T)


def build(kind: str):
    torch.manual_seed(0)
    gpt = GPT(CONFIG, backend="math")
    model = gpt if kind.startswith("lm") else GPTClassifier(gpt, 2)
    head = () if model is gpt else ("score.",)
    if "lora" in kind:
        apply_lora(model, 4, 8.0, trainable=head)
    if "last" in kind:
        freeze_all_but_last(model, 1, trainable=head)
    return model


@pytest.mark.parametrize("kind", ["lm", "lm_lora", "classifier", "classifier_lora", "classifier_last_block"])
def test_step_flops_match_what_the_step_computes(kind):
    model = build(kind)
    counted = model_flops_per_token(model, T)
    # The count also has 2 FLOPs per bias and LayerNorm weight (Kaplan's 2N), which are no matmuls.
    assert counted == pytest.approx(measured_flops_per_token(model), rel=0.03)


def test_lora_classifier_mfu_is_computed_from_the_smaller_count():
    """The issue's 110.9% MFU came from counting a LoRA classifier as full language-model
    training. Counted as the step runs, it is far smaller, and never above the step's work."""
    model = build("classifier_lora")
    counted, measured = model_flops_per_token(model, T), measured_flops_per_token(model)
    full = flops_per_token(CONFIG, T, training=True)
    assert counted < full / 1.5 and counted <= measured * 1.03
    # On a GPT-2 vocabulary the LM head is most of a tiny model's count: the old figure is ~10x too big.
    big = GPTConfig(vocab_size=50257, block_size=128, n_layer=4, n_head=4, n_embd=128)
    adapters = [4 * ((128 + 384) + (128 + 128) + (128 + 512) + (512 + 128))] * 4
    lora = step_flops_per_token(big, lm_head=False, trained=[0] * 4, adapters=adapters,
                                embeddings_trained=False, head_trained=False)
    assert flops_per_token(big, training=True) / lora > 1.109 * 5


def test_step_flops_default_is_full_training():
    assert step_flops_per_token(CONFIG, 16) == pytest.approx(flops_per_token(CONFIG, 16, training=True))
    with pytest.raises(ValueError, match="one per block"):
        step_flops_per_token(CONFIG, trained=[1, 2])


def test_prompt_masked_loss_is_charged_the_lm_head_only_where_it_runs():
    """`masked_lm_loss` applies the LM head only at target positions; MFU counts it there only,
    which matches torch's FLOP counter on that loss."""
    from minigpt.finetune.tasks import masked_lm_loss
    from minigpt.train.observe import MetricsLog, TrainWindow

    model = build("lm")
    idx = torch.randint(0, CONFIG.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    targets = torch.full((B, T), -100)
    targets[:, -3:] = idx[:, -3:]  # three completion tokens per row
    batch = {"idx": idx, "targets": targets}
    with FlopCounterMode(display=False) as counter:
        masked_lm_loss(model, batch).backward()
    measured = counter.get_total_flops()

    head_tokens = masked_lm_loss.lm_head_positions(model, batch)
    assert head_tokens == B * 3

    class Recorder(MetricsLog):
        def __init__(self):
            self.records = []

        def write(self, kind, step, values):
            self.records.append(values)

    class Bar:
        def set_postfix(self, *args, **kwargs):
            pass

    window = TrainWindow(peak=1.0, dp_size=1)
    window.add(1.0, B * T, 1.0, model, T, head_tokens)
    metrics = Recorder()
    window.write(1, 1e-3, 1.0, 0, metrics, Bar())
    counted = metrics.records[0]["mfu"]  # FLOPs done in one second at a peak of 1 FLOP/s
    full = model_flops_per_token(model, T) * B * T
    head = 3 * 2 * CONFIG.vocab_size * CONFIG.n_embd  # forward, input and weight gradients
    assert counted == pytest.approx(full - head * (B * T - head_tokens))
    # The count has 2 FLOPs per bias and LayerNorm weight (Kaplan's 2N) that are no matmuls.
    assert counted == pytest.approx(measured, rel=0.03)

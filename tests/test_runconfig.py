"""One loader for every run config (`minigpt.runconfig`): pretraining and fine-tuning read
the same override text the same way."""
import pytest

from minigpt.finetune.config import train_overrides
from minigpt.pretrain.config import load_config

ITEMS = ["--lr=3e-2", "train.max_steps=12", "--progress=no", "--compile", "warmup-steps=2"]


def test_fine_tuning_and_pretraining_overrides_give_the_same_train_values():
    pretrain = load_config(overrides=ITEMS).train
    assert train_overrides(ITEMS) == {"lr": 3e-2, "max_steps": 12, "progress": False, "compile": True,
                                      "warmup_steps": 2}
    assert all(getattr(pretrain, key) == value for key, value in train_overrides(ITEMS).items())


@pytest.mark.parametrize("item, message", [
    ("--lr=abc", r"--train.lr='abc' must be a number"),
    ("--lr", r"--train.lr needs a value"),
    ("--train.lrr=1", r"train has no key 'lrr'; valid keys are: .*\blr\b"),
])
def test_both_refuse_bad_overrides_with_the_same_message(item, message):
    with pytest.raises(ValueError, match=message):
        train_overrides([item])
    with pytest.raises(ValueError, match=message):
        load_config(overrides=[item])

"""`minigpt train --help` names each recipe once: a model preset that a recipe of the same name
shadows (`tiny`) is not offered again as "a model preset with GPT-2's training recipe"."""
from minigpt.cli.pretrain import _train_epilog
from minigpt.presets import PRESETS
from minigpt.pretrain.recipes import RECIPES


def test_train_help_lists_each_preset_name_once():
    recipes, _, rest = _train_epilog().partition("; or any model preset with GPT-2's training recipe: ")
    presets = rest.split(".\n")[0].split(", ")
    names = recipes.removeprefix("recipes (--preset): ").split(", ") + presets
    assert len(names) == len(set(names)), names
    assert set(names) == set(RECIPES) | set(PRESETS)

"""One notion of "a model you can point at", for every command that takes a model.

Three kinds of folder hold a model, and each command accepts all three:

    a model folder         config.json + weights (Hugging Face GPT-2/GPT-Neo layout or minigpt's,
                           a fine-tuned folder, or one checkpoint of a run)
    a fine-tuning run      `minigpt finetune ... --out RUN`: its exported best model, RUN/model
    a training run         `minigpt train --out-dir RUN`: its best checkpoint (else its newest),
                           under RUN/checkpoints

`resolve_model_dir` turns any of them into the model folder and says once, in the log,
which one it chose. `start_model` is where fine-tuning gets its (model, tokenizer) from any
of them, or from a fresh random model of a preset (the from-scratch baseline a pretrained
start should beat), with the special tokens it names added to both.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from minigpt.model import GPT

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


def resolve_model_dir(path: str | Path) -> Path:
    """The model folder behind `path`: itself, RUN/model, or RUN's best (else newest) checkpoint
    (also when `path` is RUN/checkpoints).

    Raises FileNotFoundError listing every place it looked when none holds a model.
    """
    from minigpt.train import checkpoint as ckpt

    folder = Path(path)
    if (folder / CONFIG_FILE).is_file():
        return folder
    exported = folder / "model"
    if (exported / CONFIG_FILE).is_file():
        log.info("%s is a fine-tuning run; using its exported best model %s", folder, exported)
        return exported
    root = folder / "checkpoints"
    if not root.is_dir() and any(folder.glob("step_*")):  # RUN/checkpoints itself: the same choice
        root = folder
    chosen = None
    if root.is_dir():
        best = ckpt.best_checkpoint(root)
        chosen = best or ckpt.latest_checkpoint(root)
        if chosen is not None:
            which = "best" if best is not None else "newest (no best recorded)"
            log.info("%s is a training run; using its %s checkpoint %s", folder, which, chosen)
            return chosen
    looked = (f"{folder / CONFIG_FILE} (a model folder), {exported / CONFIG_FILE} (a fine-tuning run's "
              f"exported model), {root}/ (a training run's checkpoints)")
    if not folder.exists():
        raise FileNotFoundError(f"model {folder} does not exist; looked for {looked}")
    raise FileNotFoundError(f"{folder} holds no model (no config.json): looked for {looked}"
                            + ("; the run has no checkpoint yet" if root.is_dir() else ""))


def preset_model_config(name: str):
    """The GPTConfig of a model preset (minigpt.presets.PRESETS) or a pretraining recipe's model
    (e.g. tiny-bpe); None when `name` is neither."""
    from minigpt.config import GPTConfig
    from minigpt.presets import PRESETS
    from minigpt.pretrain.recipes import RECIPES

    if name in RECIPES:
        model = dict(RECIPES[name]()["model"])
        preset = model.pop("preset", None)
        return GPTConfig.from_preset(preset, **model) if preset else GPTConfig.from_dict(model)
    if name in PRESETS:
        return GPTConfig.from_preset(name)
    return None


def _warn_classifier_parts_dropped(folder: Path) -> None:
    """Fine-tuning from a fine-tuned classifier starts from its backbone: say that its head and
    labels are not carried over, rather than drop them without a word."""
    from minigpt.finetune.export import HEAD_FILE, LABELS_FILE

    if not (folder / HEAD_FILE).is_file():
        return
    labels = ""
    if (folder / LABELS_FILE).is_file():
        from minigpt.finetune.data import LabelMap

        labels = f" and its labels {list(LabelMap.load(folder / LABELS_FILE).labels)}"
    log.warning("%s is a fine-tuned classifier: fine-tuning starts from its transformer (the backbone); its "
                "classification head (%s)%s are not carried over", folder, HEAD_FILE, labels)


def start_model(spec: str | Path | GPT, special_tokens: Sequence[str] = (), pad_token: str | None = None, *,
                tokenizer=None, backend: str = "sdpa", seed: int = 0) -> tuple[GPT, object]:
    """(GPT, tokenizer) to fine-tune from, with `special_tokens` added to both.

    spec: a model, run or fine-tuned folder (`resolve_model_dir`); a preset name, for a fresh
        random model with GPT-2's tokenizer (when no such folder exists); or a GPT already in
        memory, taken as it is (with `tokenizer`, else GPT-2's).
    special_tokens: added to the tokenizer and the model (growing its embedding when they are
        new, `minigpt.vocab.add_tokens`); pad_token, one of them, then pads batches.
    tokenizer: use this one instead of the folder's (checked against the model all the same).

    Raises ValueError for a preset whose vocabulary cannot hold GPT-2's tokens and for special
    tokens asked of a tokenizer other than GPT-2's; BadFileError when the tokenizer gives ids
    the model has no row for (`check_fits_model`); FileNotFoundError (listing what it looked
    for) when `spec` is neither a folder nor a preset.
    """
    import torch

    from minigpt.model import GPT
    from minigpt.tokenizer import Tokenizer, check_fits_model, load_tokenizer
    from minigpt.vocab import add_tokens

    if isinstance(spec, GPT):
        model, tokenizer = spec, tokenizer if tokenizer is not None else Tokenizer()
    elif not Path(spec).exists() and (config := preset_model_config(str(spec))) is not None:
        tokenizer = tokenizer if tokenizer is not None else Tokenizer()
        if config.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"preset {spec!r} has vocab_size={config.vocab_size}, fewer than GPT-2's {tokenizer.vocab_size} "
                f"tokens that fine-tuning uses; choose a GPT-2-vocabulary preset such as tiny-bpe or gpt2")
        log.info("starting from a fresh random %s model (seed %d): the from-scratch baseline", spec, seed)
        torch.manual_seed(seed)
        model = GPT(config, backend=backend)
    else:
        folder = resolve_model_dir(spec)
        _warn_classifier_parts_dropped(folder)
        model = GPT.from_pretrained(folder, backend=backend)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(folder)
        check_fits_model(tokenizer, model.config.vocab_size, folder)  # also GPT-2's, when the folder names none
    if special_tokens:
        if not isinstance(tokenizer, Tokenizer):
            raise ValueError(f"special tokens {list(special_tokens)} need GPT-2's tokenizer; this model's is "
                             f"{type(tokenizer).__name__}")
        if not add_tokens(model, tokenizer, special_tokens):
            log.info("special tokens %s are already in the vocabulary", list(special_tokens))
    if pad_token:
        tokenizer.set_pad_token(pad_token)
    return model, tokenizer

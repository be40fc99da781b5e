"""Hook points with TransformerLens's names: read, replace or differentiate any activation.

Every activation of `minigpt.model` passes through an identity `HookPoint`. This module
names them as TransformerLens (Nanda & Bloom 2022; its `HookedTransformer`, version 3)
does, with the values it gives them, so that its tutorials' hook code runs here unchanged
(tests/peers checks every shared name against TransformerLens itself):

    hook_embed, hook_pos_embed                                      (B, T, C)
    blocks.{i}.hook_resid_pre, .hook_resid_mid, .hook_resid_post    (B, T, C)
    blocks.{i}.ln1.hook_scale, .ln2.hook_scale                      (B, T, 1)
    blocks.{i}.ln1.hook_normalized, .ln2.hook_normalized            (B, T, C)
    blocks.{i}.attn.hook_q, .hook_k, .hook_v, .hook_z               (B, T, H, D)
    blocks.{i}.attn.hook_attn_scores, .hook_pattern                 (B, H, T, S)
    blocks.{i}.hook_attn_out, .hook_mlp_out                         (B, T, C)
    blocks.{i}.mlp.hook_pre, .mlp.hook_post                         (B, T, mlp_width)
    ln_final.hook_scale, ln_final.hook_normalized                   (B, T, 1), (B, T, C)
    unembed.hook_in, unembed.hook_out                               (B, T, C), (B, T, V)

A LayerNorm's `hook_scale` is sqrt(var + eps) of each position and its `hook_normalized`
is (x - mean) / scale, before the gain and bias, as TransformerLens records them since
version 3. What the LayerNorm returns, after gain and bias (minigpt's `hook_normalized`
before, see CHANGELOG.md), is its `hook_out`; TransformerLens has no such point.

Optional points fire only after their switch, as in TransformerLens, because they cost
memory (an H-fold copy of the residual stream per layer, or of each head's output):

    model.set_use_attn_result(True)     blocks.{i}.attn.hook_result    (B, T, H, C)
    model.set_use_attn_in(True)         blocks.{i}.hook_attn_in        (B, T, H, C)
    model.set_use_split_qkv_input(True) blocks.{i}.hook_q_input, .hook_k_input, .hook_v_input  (B, T, H, C)
    model.set_use_hook_mlp_in(True)     blocks.{i}.hook_mlp_in         (B, T, C)
    model.set_use_hook_tokens(True)     hook_tokens                    (B, T) token ids

With attn_in or split inputs on, ln1 normalizes each head's copy (its hooks gain the H
axis) and q, k, v are computed head by head, so a hook can change one head's input alone.

The model's own module names differ in four places (`ln_1`, `ln_2`, `ln_f`, and the
unembedding's points, which live on the model as `hook_unembed_in` / `_out`; kept so that
checkpoints do not change); `name_hook_points` translates them once, when GPT is built.
A hook is `fn(activation, hook)`, run as a torch forward hook of its point, and may return
a replacement. Scores and pattern exist only on the math path, and a
LayerNorm's scale and normalized input only on its spelled-out path: while one of them is
hooked, that layer computes there, whatever the backend (logged once for attention); every
other hook point leaves the fused `sdpa` / `triton` path in place. With no hook attached a
`HookPoint` returns its input object unchanged, so logits are bit-identical.

With the KV cache, each call sees only its new tokens (T = 1 when decoding); the key axis
S of scores and pattern holds the cached keys in position order (a banded layer keeps only
its window).
"""
from __future__ import annotations

import difflib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Union

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

logger = logging.getLogger(__name__)

HookFn = Callable[[torch.Tensor, "HookPoint"], Union[torch.Tensor, None]]
"""fn(activation, hook) -> replacement or None; `hook.name` is the TransformerLens name."""
NameSpec = Union[str, Callable[[str], bool], Sequence[str]]
"""A hook name, a list of them, or a predicate over names (e.g. `lambda n: n.endswith("hook_z")`)."""

# Module names of minigpt -> TransformerLens's, one path segment at a time, and the two
# points whose whole path differs (TransformerLens's unembedding is a module of its own).
_TL_SEGMENTS = {"ln_1": "ln1", "ln_2": "ln2", "ln_f": "ln_final"}
_TL_PATHS = {"hook_unembed_in": "unembed.hook_in", "hook_unembed_out": "unembed.hook_out"}
OPTIONS = ("use_attn_result", "use_attn_in", "use_split_qkv_input", "use_hook_mlp_in", "use_hook_tokens")
"""The switches of the optional hook points, by TransformerLens's config names."""
_MATH_ONLY = ("hook_attn_scores", "hook_pattern")


class HookPoint(nn.Module):
    """An identity module at one activation: the place where hooks read or replace it.

    A hook is one of torch's forward hooks on this module (`add_hook` registers it with
    `register_forward_hook`); anything registered directly, or globally with torch's
    `register_module_forward_hook`, runs here too. `name` is the TransformerLens name, given
    once when the model is built (`name_hook_points`). `option` names the switch (one of
    `OPTIONS`) of a point that fires only when asked for; such a point starts disabled and
    its owner computes it only while `enabled`.
    """

    def __init__(self, option: str | None = None) -> None:
        super().__init__()
        if option is not None and option not in OPTIONS:
            raise ValueError(f"option={option!r} is not one of {OPTIONS}")
        self.name: str | None = None
        """The TransformerLens name, set by `name_hook_points` when the model is built."""
        self.option = option
        self.enabled = option is None
        """Whether the forward passes through this point (always, unless it is optional)."""

    @property
    def active(self) -> bool:
        """Whether a forward hook is attached (the model takes the math path for a hooked pattern)."""
        return bool(self._forward_hooks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def add_hook(self, fn: HookFn, direction: str = "fwd") -> RemovableHandle:
        """Attach `fn(activation, hook)` ("fwd") or `fn(gradient, hook)` ("bwd").

        A backward hook is a tensor hook put on the activation as it passes, so it fires
        whenever backward later reaches that activation of a forward run while it was
        attached; it may return a replacement gradient.
        """
        if direction == "fwd":
            return self.register_forward_hook(lambda module, inputs, output: fn(output, self))
        if direction == "bwd":
            def attach(module, inputs, output):
                if output.requires_grad:
                    output.register_hook(lambda grad: fn(grad, self))
            return self.register_forward_hook(attach)
        raise ValueError(f"direction={direction!r} must be 'fwd' or 'bwd'")

    def extra_repr(self) -> str:
        return self.name or ""


def _tl_name(path: str) -> str:
    return _TL_PATHS.get(path) or ".".join(_TL_SEGMENTS.get(part, part) for part in path.split("."))


def name_hook_points(model: nn.Module) -> None:
    """Give every hook point of `model` its TransformerLens name, from its module path.

    Called once, by `GPT.__init__`, as TransformerLens's `HookedRootModule.setup` does: the
    names stay the same when the model is later wrapped, copied or compiled.
    """
    for path, module in model.named_modules():
        if isinstance(module, HookPoint):
            module.name = _tl_name(path)


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """Every hook point of `model` by its TransformerLens name, in module order (a cache
    keeps the order of the forward); disabled optional points included.

    Raises ValueError for a hook point added after the model was built (it has no name).
    """
    points = {}
    for path, module in model.named_modules():
        if isinstance(module, HookPoint):
            if module.name is None:
                raise ValueError(f"the hook point at {path!r} has no name: hook points are named once, when the "
                                 f"model is built; call minigpt.hooks.name_hook_points(model) after replacing one")
            points[module.name] = module
    return points


def set_option(model: nn.Module, option: str, enabled: bool) -> nn.Module:
    """Switch the optional hook points of `option` (one of `OPTIONS`) on or off; returns `model`."""
    if option not in OPTIONS:
        close = difflib.get_close_matches(option, OPTIONS, n=1)
        raise ValueError(f"{option!r} is not a hook option{'; did you mean ' + close[0] + '?' if close else ''} "
                         f"(options: {', '.join(OPTIONS)})")
    if not isinstance(enabled, bool):
        raise ValueError(f"{option} takes True or False; got {enabled!r}")
    for module in model.modules():
        if isinstance(module, HookPoint) and module.option == option:
            module.enabled = enabled
    return model


def resolve(model: nn.Module, spec: NameSpec) -> list[HookPoint]:
    """The hook points a name, a list of names or a predicate selects.

    Raises ValueError for an unknown name (listing the closest ones) or a predicate that
    selects nothing.
    """
    return _select(hook_points(model), spec)


def _select(points: dict[str, HookPoint], spec: NameSpec) -> list[HookPoint]:
    if isinstance(spec, str):
        point = points.get(spec)
        if point is not None and not point.enabled:
            raise ValueError(f"{spec} fires only after model.set_{point.option}(True) (an optional hook point, "
                             f"as in TransformerLens: it costs memory, so it is off until asked for)")
        if spec not in points:
            close = difflib.get_close_matches(spec, list(points), n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid names look like {next(iter(points))!r}"
            raise ValueError(f"no hook point named {spec!r}{hint} (all names: minigpt.hooks.hook_points(model))")
        return [points[spec]]
    if callable(spec):
        # A predicate selects among the points that fire; a disabled optional one never would.
        chosen = [p for name, p in points.items() if p.enabled and spec(name)]
        if not chosen:
            raise ValueError(f"the predicate {spec!r} selects none of the {len(points)} hook points")
        return chosen
    if isinstance(spec, Sequence):
        return [p for name in spec for p in _select(points, name)]
    raise ValueError(f"a hook name must be a str, a list of str or a predicate over names; got {type(spec).__name__}")


@functools.lru_cache(maxsize=None)
def _log_math_once(backend: str) -> None:
    logger.info("attention scores and patterns exist only on the math path: a layer whose hook_attn_scores or "
                "hook_pattern is hooked runs 'math' instead of %r while it is hooked", backend)


@contextmanager
def hooks(model: nn.Module, fwd_hooks: Sequence[tuple[NameSpec, HookFn]] = (),
          bwd_hooks: Sequence[tuple[NameSpec, HookFn]] = ()) -> Iterator[nn.Module]:
    """Attach (name_or_predicate, fn) pairs for the body of a `with`; always removes them.

    Raises ValueError for an unknown name or a pair that is not (name, callable).
    """
    handles: list[RemovableHandle] = []
    try:
        for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
            for pair in pairs:
                if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and callable(pair[1])):
                    raise ValueError(f"{direction}_hooks takes (name_or_predicate, fn) pairs; got {pair!r}")
                for point in resolve(model, pair[0]):
                    if point.name.endswith(_MATH_ONLY) and model.backend != "math":
                        _log_math_once(model.backend)
                    handles.append(point.add_hook(pair[1], direction))
        yield model
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def recording(points: Sequence[HookPoint]) -> Iterator[list[torch.Tensor]]:
    """A list that receives what each of `points` passes on, in call order, for the body of
    a `with` (`GPT.hidden` records its attentions so); always removes its hooks."""
    seen: list[torch.Tensor] = []
    handles = [point.register_forward_hook(lambda module, args, out: seen.append(out)) for point in points]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def run_with_hooks(model: nn.Module, idx: torch.Tensor, fwd_hooks: Sequence[tuple[NameSpec, HookFn]] = (),
                   bwd_hooks: Sequence[tuple[NameSpec, HookFn]] = (), return_type: str = "logits", **kwargs):
    """One forward with hooks attached; returns the logits (or the `GPTOutput` with
    return_type="output"). `kwargs` go to `GPT.forward` (targets, cache, left_pad, ...)."""
    if return_type not in ("logits", "output"):
        raise ValueError(f"return_type={return_type!r} must be 'logits' or 'output'")
    with hooks(model, fwd_hooks, bwd_hooks):
        out = model(idx, **kwargs)
    return out.logits if return_type == "logits" else out


class ActivationCache(dict):
    """Activations by hook name; gradients (with `incl_bwd`) under name + "_grad".

    Besides full names, `cache["z", 3]` means `blocks.3.attn.hook_z` and
    `cache["normalized", 3, "ln1"]` means `blocks.3.ln1.hook_normalized`, as in TransformerLens.
    A name TransformerLens only has behind a switch (`hook_result`, ...) that is missing
    says which switch turns it on.
    """

    def __init__(self, *args, disabled: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.disabled = disabled or {}
        """Names of the model's optional hook points that were off, with their switch."""

    def __getitem__(self, key):
        if isinstance(key, tuple):
            short, layer, *sub = key
            ends = f".{sub[0]}.hook_{short}" if sub else f".hook_{short}"
            found = [k for k in self if k.startswith(f"blocks.{layer}.") and k.endswith(ends)]
            if len(found) != 1:
                raise KeyError(f"{key!r} names {len(found)} cached activations {found}; use a full name")
            key = found[0]
        if key not in self:
            option = self.disabled.get(str(key).removesuffix("_grad"))
            if option is not None:
                raise KeyError(f"{key!r} is not in the cache: it is an optional hook point; call "
                               f"model.set_{option}(True) before run_with_cache")
            close = difflib.get_close_matches(str(key), list(self), n=5, cutoff=0.5)
            raise KeyError(f"{key!r} is not in the cache{'; did you mean ' + ', '.join(close) + '?' if close else ''}")
        return super().__getitem__(key)


def run_with_cache(model: nn.Module, idx: torch.Tensor, names_filter: NameSpec | None = None, incl_bwd: bool = False,
                   metric: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   **kwargs) -> tuple[torch.Tensor, ActivationCache]:
    """Run the model and keep the activations `names_filter` selects (default: all).

    Returns (logits (B, T, V), ActivationCache of detached tensors). With `incl_bwd=True`
    it also backpropagates a scalar, `metric(logits)` or else the loss of `targets=...`,
    and caches each activation's gradient as name + "_grad". Caching a scores or pattern
    hook switches its layer to the math path for this call. `kwargs` go to `GPT.forward`.
    Raises ValueError for unknown names or `incl_bwd` without a scalar to differentiate.
    """
    every = hook_points(model)
    points = [p for p in every.values() if p.enabled] if names_filter is None else resolve(model, names_filter)
    cache = ActivationCache(disabled={name: p.option for name, p in every.items() if not p.enabled})

    def keep(act: torch.Tensor, hook: HookPoint) -> None:
        cache[hook.name] = act.detach()

    def keep_grad(grad: torch.Tensor, hook: HookPoint) -> None:
        cache[hook.name + "_grad"] = grad.detach()

    names = [p.name for p in points]
    with hooks(model, [(names, keep)], [(names, keep_grad)] if incl_bwd else []):
        out = model(idx, **kwargs)
        if incl_bwd:
            value = metric(out.logits) if metric is not None else out.loss
            if value is None or value.dim() != 0:
                raise ValueError("incl_bwd=True differentiates a scalar: pass metric=fn(logits) -> scalar, "
                                 "or targets=... to use the loss")
            value.backward()
    return out.logits, cache

"""The GPT model: token + learned position embeddings, pre-norm blocks, tied LM head.

Shape letters used in comments throughout:
    B batch, T sequence length (queries), S keys, C n_embd, H n_head, D head_dim = C / H,
    V vocab_size.

Each block is the two residual lines of GPT-2 (Radford et al. 2019, section 2.3):
    x = x + attn(ln_1(x))
    x = x + mlp(ln_2(x))
Layers are 'dense' (full causal attention) or 'banded' (query i sees keys i-w+1..i), as
set per layer by `GPTConfig.attention_pattern` (GPT-3 and GPT-Neo alternate them).

Every activation passes through an identity `HookPoint` (`self.hook_*`) that readers can
hook by TransformerLens's names (`blocks.3.attn.hook_z`); see `minigpt.hooks`. With no
hook attached they change nothing, bit for bit.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from minigpt import hooks as hookpoints
from minigpt import cpu_decode, ops
from minigpt.hooks import HookPoint
from minigpt.cache import KVCache, LayerCache
from minigpt.config import GPTConfig


@dataclass
class GPTOutput:
    """What `GPT.forward` returns."""

    logits: torch.Tensor
    """(B, T, V) next-token logits (only the last position when asked for `last_only`)."""
    loss: torch.Tensor | None = None
    """Mean cross-entropy over targets that are not -100, when targets were given."""
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """n_layer + 1 tensors (B, T, C): the residual stream entering each block, then the
    final normed output that the head reads."""
    attentions: tuple[torch.Tensor, ...] | None = None
    """n_layer tensors (B, H, T, S) of attention probabilities (from the math path)."""


class LayerNorm(ops.UsesBackend, nn.Module):
    """LayerNorm with an optional bias; parameter names match `torch.nn.LayerNorm`."""

    def __init__(self, n: int, eps: float, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None
        self.eps = eps
        # As TransformerLens (>= 3) defines them: the scale sqrt(var + eps) (..., 1) and the
        # normalized input (x - mean) / scale (..., C), both before the gain and bias; then
        # the output after them (..., C), which TransformerLens does not hook.
        self.hook_scale, self.hook_normalized, self.hook_out = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hook_scale.active or self.hook_normalized.active:
            return self.hook_out(self._spelled_out(x))
        return self.hook_out(ops.layer_norm(x, self.weight, self.bias, self.eps, self.backend))

    def _spelled_out(self, x: torch.Tensor) -> torch.Tensor:
        # TransformerLens's LayerNorm step by step (statistics in float32), so that the scale
        # and the normalized input pass through their hook points; taken only while one of
        # them is hooked, as the fused path has neither.
        centred = x.float() - x.float().mean(-1, keepdim=True)
        scale = self.hook_scale((centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        normalized = self.hook_normalized(centred / scale).to(x.dtype)
        return normalized * self.weight if self.bias is None else normalized * self.weight + self.bias


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, state dict and init) whose product is `ops.linear`: on a
    CPU, oneDNN's (about twice MKL's speed on the development VM with AVX-512), MKL's for
    training on an x86 CPU with AVX2 alone (see `ops.linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class CausalSelfAttention(ops.UsesBackend, nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.window = config.layer_window(layer)
        self.scale = config.softmax_scale
        self.dropout = config.dropout
        self.qkv = Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)
        self.proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()  # (B, T, H, D)
        self.hook_attn_scores, self.hook_pattern = HookPoint(), HookPoint()  # (B, H, T, S)
        self.hook_z = HookPoint()  # (B, T, H, D): each head's output, before the projection
        self.hook_result = HookPoint("use_attn_result")  # (B, T, H, C): each head's share of the output

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor], cache=None, start: int = 0,
                left_pad: torch.Tensor | None = None) -> torch.Tensor:
        """x: the normed input (B, T, C), or one per head for q, k and v, 3 x (B, T, H, C)."""
        if isinstance(x, tuple):
            q, k, v = self._qkv_by_head(*x)  # 3 x (B, T, H, D)
            B, T, H, D = q.shape
        else:
            B, T, C = x.shape
            D = C // self.n_head
            # H is this rank's heads: all of them, or n_head / tp under tensor parallelism,
            # where the projection gives this rank's q, k and v columns (minigpt.train.parallel).
            q, k, v = (t.view(B, T, -1, D) for t in self.qkv(x).chunk(3, dim=2))  # 3 x (B, T, H, D)
            H = q.shape[2]
        q = self.hook_q(q).transpose(1, 2)  # (B, H, T, D)
        k = self.hook_k(k).transpose(1, 2)  # (B, H, T, D)
        v = self.hook_v(v).transpose(1, 2)  # (B, H, T, D)

        if self.hook_attn_scores.active or self.hook_pattern.active:
            y = self._attention_with_pattern(q, k, v, cache, start, left_pad)
        elif cache is None and left_pad is None:
            y, _ = ops.causal_attention(
                q, k, v, window=self.window, scale=self.scale, backend=self.backend,
                dropout_p=self.dropout, training=self.training,
            )
        else:
            if cache is not None:
                k, v, k_index = cache.update(k, v, start)  # (B, H, S, D) x 2, (S,)
            else:
                k_index = torch.arange(T, device=x.device)
            y, _ = ops.indexed_attention(
                q, k, v, start=start, k_index=k_index, window=self.window, left_pad=left_pad,
                scale=self.scale, backend=self.backend,
            )
        z = self.hook_z(y.transpose(1, 2))  # (B, T, H, D)
        if self.hook_result.enabled:
            return self.resid_dropout(self._project_by_head(z))
        return self.resid_dropout(self.proj(z.reshape(B, T, H * D)))

    def _qkv_by_head(self, q_in, k_in, v_in) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, T, H, D), head h's from its own input [:, :, h] (B, T, H, C) through
        its rows of the fused projection (TransformerLens's split inputs)."""
        C = q_in.shape[-1]
        weight = self.qkv.weight.view(3, self.n_head, -1, C)  # (3, H, D, C); LoRA's merged matrix
        bias = self.qkv.bias.view(3, self.n_head, -1) if self.qkv.bias is not None else None  # (3, H, D)
        out = [torch.einsum("bthc,hdc->bthd", inp, weight[j]) for j, inp in enumerate((q_in, k_in, v_in))]
        return tuple(o + bias[j] for j, o in enumerate(out)) if bias is not None else tuple(out)

    def _project_by_head(self, z: torch.Tensor) -> torch.Tensor:
        """The output projection as a sum over heads, each head's term (B, T, H, C) through
        `hook_result` (TransformerLens's attention result); then the bias."""
        H, D = z.shape[2], z.shape[3]
        weight = self.proj.weight.view(-1, H, D)  # (C, H, D)
        out = self.hook_result(torch.einsum("bthd,chd->bthc", z, weight)).sum(dim=2)  # (B, T, C)
        return out if self.proj.bias is None else out + self.proj.bias

    def _attention_with_pattern(self, q, k, v, cache, start, left_pad) -> torch.Tensor:
        # The math path, spelled out so that the scores and the pattern pass through their
        # hook points; taken, whatever the backend, only while one of them is hooked.
        T = q.shape[2]
        if cache is not None:
            k, v, k_index = cache.update(k, v, start)  # (B, H, S, D) x 2, (S,)
            order = torch.argsort(k_index)  # a banded layer's ring, in position order
            k, v, k_index = k[:, :, order], v[:, :, order], k_index[order]
        else:
            k_index = torch.arange(T, device=q.device)
        q_index = torch.arange(start, start + T, device=q.device)
        mask = ops.band_mask(q_index, k_index, self.window, left_pad)  # (T, S) or (B, 1, T, S)
        scores = self.hook_attn_scores(ops.attention_scores(q, k, mask, self.scale))  # (B, H, T, S) float32
        pattern = self.hook_pattern(torch.softmax(scores, dim=-1).to(q.dtype))  # (B, H, T, S)
        return F.dropout(pattern, p=self.dropout, training=self.training) @ v  # (B, H, T, D)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = Linear(config.n_embd, config.mlp_width, bias=config.bias)
        self.proj = Linear(config.mlp_width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()  # (B, T, mlp_width): before / after GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hook_post(F.gelu(self.hook_pre(self.fc(x)), approximate=self.approximate))
        return self.dropout(self.proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_eps, config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_eps, config.bias)
        self.mlp = MLP(config)
        # The residual stream entering, between and leaving the two branches, and each
        # branch's contribution to it; all (B, T, C).
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()
        # Optional, as in TransformerLens: the stream copied once per head (B, T, H, C), for
        # all of q, k, v or for each; and the MLP's input (B, T, C), a copy of resid_mid.
        self.hook_attn_in = HookPoint("use_attn_in")
        self.hook_q_input, self.hook_k_input = HookPoint("use_split_qkv_input"), HookPoint("use_split_qkv_input")
        self.hook_v_input = HookPoint("use_split_qkv_input")
        self.hook_mlp_in = HookPoint("use_hook_mlp_in")

    def forward(self, x, cache=None, start=0, left_pad=None):
        if cache is not None and left_pad is None and x.shape[:2] == (1, 1) and self._c_may_decode(x, cache):
            out = self._decode_in_c(x, cache, start)
            if out is not None:
                return out
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self._attention_input(x), cache, start, left_pad)))
        mlp_in = self.hook_mlp_in(x.clone()) if self.hook_mlp_in.enabled else x
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.ln_2(mlp_in))))

    def _c_may_decode(self, x: torch.Tensor, cache) -> bool:
        """Whether one token of one row may take `cpu_decode` (this block's forward in one C
        call, about 0.2 ms less per block on the development VM): only where nothing but
        rounding could tell it from the torch path below. No gradient, no active dropout, no
        hook anywhere in the block (torch's global module hooks included), no optional hook
        point switched on, the modules this file defines with their own `forward` (not LoRA's
        or another wrapper, nor a patched method), eager CPU execution (no compile, tracer,
        dispatch mode or torch.func), and the cache's own layer type.

        The rounding: float32 rounding for a float32 model. A bfloat16 model's block computes
        in float32 between the values it reads and those it stores (the cache's new key and
        value, its output), where torch's operators round every intermediate to bfloat16: its
        logits are closer to float64's, and differ from torch's path by bfloat16 steps."""
        if x.device.type != "cpu" or torch.is_grad_enabled() or x.dtype not in cpu_decode.DTYPES or type(cache) is not LayerCache:
            return False
        if not cpu_decode.available() or _global_module_hooks() or not _hook_free(self):
            return False
        parts = self._modules  # (read directly: nn.Module's attribute lookup costs ~0.5 us a name)
        attn, mlp = parts["attn"], parts["mlp"]
        if (type(parts["ln_1"]), type(parts["ln_2"]), type(attn), type(mlp)) != (LayerNorm, LayerNorm, CausalSelfAttention, MLP):
            return False
        a, m = attn._modules, mlp._modules
        products = (a["qkv"], a["proj"], m["fc"], m["proj"])
        if {type(p) for p in products} != {Linear}:
            return False
        if _patched_forward() or any("forward" in part.__dict__ for part in (self, attn, mlp, parts["ln_1"], parts["ln_2"], *products)):
            return False
        if self.training and (attn.dropout or a["resid_dropout"].p or m["dropout"].p):
            return False
        if any(parts[name].enabled for name in ("hook_attn_in", "hook_q_input", "hook_mlp_in")) or a["hook_result"].enabled:
            return False
        return ops._plain_eager_cpu(x, a["qkv"].weight)

    def _decode_in_c(self, x: torch.Tensor, cache, start: int) -> torch.Tensor | None:
        """This block's output for one token by `cpu_decode` (its reference is `forward`'s
        torch path), or None where the kernel cannot take these tensors."""
        attn, mlp = self._modules["attn"], self._modules["mlp"]
        cache.check_fits(start + 1)  # past a shortened cache: the same error as torch's path
        slot, count = cache.one_token_slots(start)
        ln_1, ln_2 = self._modules["ln_1"], self._modules["ln_2"]
        parameters = [m._parameters for m in (ln_1, attn._modules["qkv"], attn._modules["proj"], ln_2,
                                              mlp._modules["fc"], mlp._modules["proj"])]
        weights = tuple(p.get(name) for p in parameters for name in ("weight", "bias"))  # a missing bias: None
        settings = (attn.n_head, ln_1.eps, ln_2.eps, attn.scale, mlp.approximate)
        settings_and_plan = _C_PLANS.get(self)
        if settings_and_plan is None or settings_and_plan[0] != settings or not settings_and_plan[1].matches(weights):
            if not cpu_decode.BlockPlan.usable(weights) or weights[2].shape[0] != 3 * x.shape[-1] or ln_1.eps != ln_2.eps:
                return None  # not float32/bfloat16 on the CPU, tensor parallel's share of heads, two epsilons
            _HOOK_FREE.pop(self, None)  # new modules may bring hooks registered before the last walk
            if not _hook_free(self):
                return None
            activation = "gelu_tanh" if mlp.approximate == "tanh" else "gelu"  # as MLP.forward reads it
            try:
                plan = cpu_decode.BlockPlan(weights, n_head=attn.n_head, eps=ln_1.eps, scale=attn.scale,
                                            activation=activation)
            except ValueError:
                return None  # a shape the kernel does not take (a bias that broadcasts): torch's path
            settings_and_plan = _C_PLANS[self] = (settings, plan)
        return settings_and_plan[1].step(x, cache.k, cache.v, slot, count)

    def _attention_input(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ln_1(x) (B, T, C); with per-head inputs switched on, ln_1 of a copy of x for each
        head, for q, k and v (3 x (B, T, H, C)), as TransformerLens computes them."""
        split, shared = self.hook_q_input.enabled, self.hook_attn_in.enabled
        if not (split or shared):
            return self.ln_1(x)
        copy = lambda: x[:, :, None, :].expand(-1, -1, self.attn.n_head, -1).clone()  # noqa: E731 (B, T, H, C)
        attn_in = self.hook_attn_in(copy()) if shared else None
        if split:  # TransformerLens takes these from the stream itself, even with attn_in on
            return tuple(self.ln_1(hook(copy())) for hook in (self.hook_q_input, self.hook_k_input, self.hook_v_input))
        normed = self.ln_1(attn_in)
        return normed, normed, normed


def _global_module_hooks() -> bool:
    """Whether a hook is registered for every module (torch's `register_module_forward_hook`
    and `_pre_hook`); such a hook must see each module run, so no block is computed in C."""
    module = torch.nn.modules.module
    return bool(getattr(module, "_global_forward_hooks", None) or getattr(module, "_global_forward_pre_hooks", None))


_C_PLANS: "weakref.WeakKeyDictionary[Block, tuple[tuple, cpu_decode.BlockPlan]]" = weakref.WeakKeyDictionary()
"""Each block's settings (heads, epsilons, scale, GELU) and weights as `cpu_decode` reads them,
kept outside the module (so pickling, deepcopy and state dicts never see them) and rebuilt
when either no longer matches."""


def _patched_forward() -> bool:
    """Whether a class's `forward` that the C block stands for was replaced since import."""
    return any(cls.forward is not forward for cls, forward in _OWN_FORWARDS)


_HOOK_FREE: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
"""Module -> torch's hook-handle counter when a walk last found no hook in it."""


def _hook_free(module: nn.Module) -> bool:
    """Whether no forward hook or pre-hook sits in `module`. Every hook torch registers takes a
    handle whose id comes from one counter (`RemovableHandle.next_id`); while it has not moved
    since a walk found none, there is still none (removing a hook cannot add one), and the walk
    is skipped: it reads ~35 modules that a decoded token's weights have pushed out of the
    cache, 0.13 ms of a 6 x 384 token and 0.37 of a 124M one (benchmarks/NOTES.md). A block
    whose weights are replaced is walked again (`_decode_in_c` forgets it). The one case it
    misses: a module without weights (a HookPoint, a Dropout) hooked before that walk and
    swapped into the block after it; hook a module after putting it in place."""
    stamp = getattr(RemovableHandle, "next_id", None)
    if stamp is not None and _HOOK_FREE.get(module) == stamp:
        return True
    if _hooked(module):
        return False
    if stamp is not None:
        _HOOK_FREE[module] = stamp
    return True


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook or pre-hook sits on `module` or any module inside it (a walk of
    the `_modules` dicts: a third of `module.modules()`'s cost, paid when `_hook_free` cannot skip it)."""
    stack = [module]
    while stack:
        m = stack.pop()
        if m._forward_hooks or m._forward_pre_hooks:
            return True
        stack.extend(m._modules.values())
    return False


class GPT(nn.Module):
    """A decoder-only transformer. See the module docstring for the architecture."""

    def __init__(self, config: GPTConfig, backend: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_eps, config.bias)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()  # (B, T, C) each
        self.hook_tokens = HookPoint("use_hook_tokens")  # (B, T) the ids, optional as in TransformerLens
        # TransformerLens's unembed.hook_in (B, T, C) and .hook_out (B, T, V), named so by minigpt.hooks.
        self.hook_unembed_in, self.hook_unembed_out = HookPoint(), HookPoint()
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) at init: each block
        # adds two branches to the residual stream (Radford et al. 2019, section 2.3).
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        ops.use_backend(self, backend)
        hookpoints.name_hook_points(self)  # once, as TransformerLens's setup() does

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def backend(self) -> str:
        return self.ln_f.backend

    def set_backend(self, backend: str) -> "GPT":
        """Choose the attention/LayerNorm backend: 'math', 'sdpa' or 'triton'; see `ops.use_backend`."""
        return ops.use_backend(self, backend)

    def _check_input(self, idx: torch.Tensor, start: int) -> None:
        # Shape, dtype and length only: these cost no device sync and no torch.compile graph
        # break. The ids' values are checked where they enter (the data loaders, `generate`);
        # `_embed_tokens` names an out-of-range id that reaches the model on a CPU anyway.
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise ValueError(f"idx must be a (batch, seq) tensor of token ids; got {getattr(idx, 'shape', type(idx))}")
        if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"idx must hold integer token ids; got dtype {idx.dtype} (use .long())")
        T = idx.shape[1]
        if T == 0:
            raise ValueError("idx has no tokens (seq length 0)")
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}; "
                f"crop the input to the last {self.config.block_size} tokens"
            )

    def _embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, C). On a CPU torch raises IndexError for an id outside the
        table; this turns it into a ValueError that names the id, at no cost for valid ids.
        (A GPU's kernel fails on the device instead, which is why entry points check ids.)"""
        try:
            return self.tok_emb(idx)
        except IndexError:
            lo, hi = int(idx.min()), int(idx.max())
            if lo >= 0 and hi < self.config.vocab_size:
                raise
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is out of range for vocab_size={self.config.vocab_size}") from None

    def hidden(
        self,
        idx: torch.Tensor,
        *,
        cache: KVCache | None = None,
        left_pad: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        """Run the blocks; return (final normed hidden (B, T, C), hidden states, attentions).

        Hidden states are the stream entering each block, then the final normed output.
        Attentions are what each block's `hook_pattern` passes on, recorded for this call
        (a hooked pattern puts its layer on the math path).
        """
        start = cache.length if cache is not None else 0
        self._check_input(idx, start)
        if cache is not None:
            left_pad = cache.left_pad
        if self.hook_tokens.enabled:
            idx = self.hook_tokens(idx)
        B, T = idx.shape
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        if left_pad is not None:
            pos = (pos[None, :] - left_pad[:, None]).clamp(min=0)  # (B, T)
        pos_emb = self.pos_emb(pos).expand(B, -1, -1)  # (B, T, C), a view
        x = self.drop(self.hook_embed(self._embed_tokens(idx)) + self.hook_pos_embed(pos_emb))  # (B, T, C)
        states = []
        with hookpoints.recording([b.attn.hook_pattern for b in self.blocks] if output_attentions else []) as patterns:
            for i, block in enumerate(self.blocks):
                if output_hidden_states:
                    states.append(x)
                x = block(x, cache.layers[i] if cache is not None else None, start, left_pad)
        x = self.ln_f(x)
        if cache is not None:
            cache.length += T
        return x, (*states, x) if output_hidden_states else None, tuple(patterns) if output_attentions else None

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        left_pad: torch.Tensor | None = None,
        last_only: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> GPTOutput:
        """idx: (B, T) token ids; targets: (B, T) next tokens, -100 where no loss is taken.

        Raises ValueError for non-integer ids, sequences longer than block_size, and (on a
        CPU; elsewhere check ids before, as the loaders and `generate` do) ids out of range.
        """
        x, states, attentions = self.hidden(
            idx, cache=cache, left_pad=left_pad,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C): decoding needs only the newest position
        logits = self.hook_unembed_out(self.lm_head(self.hook_unembed_in(x)))  # (B, T, V)
        loss = None
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return GPTOutput(logits=logits, loss=loss, hidden_states=states, attentions=attentions)

    def run_with_cache(self, idx: torch.Tensor, **kwargs):
        """(logits, cache of activations by hook name); see `minigpt.hooks.run_with_cache`."""
        return hookpoints.run_with_cache(self, idx, **kwargs)

    def run_with_hooks(self, idx: torch.Tensor, **kwargs):
        """Logits of a forward with temporary hooks; see `minigpt.hooks.run_with_hooks`."""
        return hookpoints.run_with_hooks(self, idx, **kwargs)

    def hooks(self, fwd_hooks=(), bwd_hooks=()):
        """Context manager that attaches hooks and always removes them; see `minigpt.hooks.hooks`."""
        return hookpoints.hooks(self, fwd_hooks, bwd_hooks)

    def set_use_attn_result(self, enabled: bool) -> "GPT":
        """Compute the output projection head by head, through `blocks.{i}.attn.hook_result`."""
        return hookpoints.set_option(self, "use_attn_result", enabled)

    def set_use_attn_in(self, enabled: bool) -> "GPT":
        """Give each head its own copy of the attention input, through `blocks.{i}.hook_attn_in`."""
        return hookpoints.set_option(self, "use_attn_in", enabled)

    def set_use_split_qkv_input(self, enabled: bool) -> "GPT":
        """Give each head's q, k and v their own inputs, through `hook_q_input` / `_k_` / `_v_`."""
        return hookpoints.set_option(self, "use_split_qkv_input", enabled)

    def set_use_hook_mlp_in(self, enabled: bool) -> "GPT":
        """Pass a copy of each MLP's input through `blocks.{i}.hook_mlp_in`."""
        return hookpoints.set_option(self, "use_hook_mlp_in", enabled)

    def set_use_hook_tokens(self, enabled: bool) -> "GPT":
        """Pass the token ids through `hook_tokens` (TransformerLens's `use_hook_tokens`)."""
        return hookpoints.set_option(self, "use_hook_tokens", enabled)

    def new_cache(self, batch_size: int, left_pad: torch.Tensor | None = None,
                  max_length: int | None = None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, dtype=p.dtype, device=p.device, left_pad=left_pad,
                       max_length=max_length)

    def num_params(self) -> int:
        """Trainable parameters of this instance, counting a tied matrix once."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int, **kwargs):
        """Sample continuations; see `minigpt.generate.generate` for the arguments."""
        from minigpt.generate import generate

        return generate(self, prompts, max_new_tokens, **kwargs)

    @torch.no_grad()
    def resize_token_embeddings(self, new_vocab_size: int, mean_of: int | None = None) -> "GPT":
        """Grow to `new_vocab_size` token rows in place (for added special tokens); returns self.

        Old rows are kept bit for bit; new rows (the head's too, when untied) start at the mean
        of rows 0..mean_of-1 (default: all), so a new token's first logit is the average of
        the old ones and the distribution over old tokens barely moves (Hewitt 2021). Give the
        tokenizer's size as `mean_of` when vocab_size is padded (50304), to leave the untrained
        padding rows out. Raises ValueError for shrinking (it would drop trained rows) or for
        mean_of out of range.
        """
        old = self.config.vocab_size
        mean_of = old if mean_of is None else mean_of
        if new_vocab_size < old:
            raise ValueError(f"new_vocab_size={new_vocab_size} is below the model's vocab_size={old}; "
                             f"shrinking would drop trained rows (only growing is supported)")
        if not 0 < mean_of <= old:
            raise ValueError(f"mean_of={mean_of} must be in 1..{old} (the rows to average)")
        if new_vocab_size == old:
            return self

        def grown(p: nn.Parameter) -> nn.Parameter:  # (old, ...) -> (new_vocab_size, ...)
            mean = p[:mean_of].float().mean(0).to(p.dtype)
            return nn.Parameter(torch.cat([p, mean.expand(new_vocab_size - old, *p.shape[1:])]), p.requires_grad)

        tied = self.lm_head.weight is self.tok_emb.weight
        self.tok_emb.weight = grown(self.tok_emb.weight)
        self.lm_head.weight = self.tok_emb.weight if tied else grown(self.lm_head.weight)
        if self.lm_head.bias is not None:
            self.lm_head.bias = grown(self.lm_head.bias)
        self.tok_emb.num_embeddings = self.lm_head.out_features = new_vocab_size
        self.config = self.config.replace(vocab_size=new_vocab_size)
        return self

    @classmethod
    def from_pretrained(cls, path: str | Path, backend: str = "sdpa") -> "GPT":
        """Load a GPT-2 / GPT-Neo folder in the Hugging Face layout, or one saved by minigpt."""
        from minigpt.weights import load_pretrained

        return load_pretrained(path, cls, backend=backend)

    def save_pretrained(self, path: str | Path) -> None:
        """Save in the Hugging Face layout of the family that represents this config exactly."""
        from minigpt.weights import save_pretrained

        save_pretrained(self, path)


# The forwards the C block stands for, as defined above (`_patched_forward` compares against them).
_OWN_FORWARDS = tuple((cls, cls.forward) for cls in (LayerNorm, Linear, CausalSelfAttention, MLP, HookPoint))

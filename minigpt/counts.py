"""Parameter, FLOP and memory counts computed from a config alone (a 175B config allocates nothing)."""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Protocol


class ModelShape(Protocol):
    """The fields of `minigpt.config.GPTConfig` that the counts read.

    A structural type, so that this module does not import config.py: config.py calls
    into this one (`GPTConfig.num_params`), and modules should not import each other.
    """

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    bias: bool
    qkv_bias: bool
    tie_embeddings: bool

    @property
    def mlp_width(self) -> int: ...

    def layer_window(self, layer: int) -> int | None: ...

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
"""Bytes per value of the dtypes the memory counts are given in."""

BACKENDS = ("math", "sdpa", "triton")
"""The attention backends of `minigpt.ops`, whose work the `backend=` counts follow."""


def block_param_breakdown(config: ModelShape) -> dict[str, int]:
    """Trainable parameters of one block by component, keyed by module path in `model.Block`.

    attn.q, attn.k and attn.v are the three equal row-slices of the fused `attn.qkv`
    (weight rows [0:C], [C:2C], [2C:3C] and the matching bias entries).
    """
    C, M = config.n_embd, config.mlp_width
    ln = C * (2 if config.bias else 1)
    q = C * C + (C if config.qkv_bias else 0)
    return {
        "ln_1": ln,
        "attn.q": q,
        "attn.k": q,
        "attn.v": q,
        "attn.proj": C * C + (C if config.bias else 0),
        "ln_2": ln,
        "mlp.fc": C * M + (M if config.bias else 0),
        "mlp.proj": M * C + (C if config.bias else 0),
    }


def param_breakdown(config: ModelShape) -> dict[str, int]:
    """Trainable parameters by component, mirroring the modules in `model.py`.

    Keys: tok_emb, pos_emb, per_block (one block), blocks (all of them), ln_f, lm_head
    (0 when tied to tok_emb). `block_param_breakdown` splits per_block further.
    """
    C, V = config.n_embd, config.vocab_size
    ln = C * (2 if config.bias else 1)
    per_block = sum(block_param_breakdown(config).values())
    return {
        "tok_emb": V * C,
        "pos_emb": config.block_size * C,
        "per_block": per_block,
        "blocks": config.n_layer * per_block,
        "ln_f": ln,
        "lm_head": 0 if config.tie_embeddings else V * C,
    }


def params(config: ModelShape, non_embedding: bool = False) -> int:
    """Total trainable parameters; `non_embedding` leaves out the token and position tables."""
    parts = param_breakdown(config)
    total = parts["tok_emb"] + parts["pos_emb"] + parts["blocks"] + parts["ln_f"] + parts["lm_head"]
    if non_embedding:
        total -= parts["tok_emb"] + parts["pos_emb"]
    return total


def attention_context(config: ModelShape, seq_len: int, layer: int) -> int:
    """How many keys a query of `layer` attends to, at most: T for dense, min(w, T) for banded."""
    window = config.layer_window(layer)
    return seq_len if window is None else min(window, seq_len)


def computed_attention_context(config: ModelShape, seq_len: int, layer: int, backend: str | None = None) -> float:
    """Keys per query that `layer` computes a score for, averaged over the T queries.

    backend=None is the useful work (`attention_context`: T dense, min(w, T) banded), the
    MFU convention. With a backend of `minigpt.ops`, the work it does:

    - dense layers: T on every backend (the causal half is not subtracted, as above);
    - banded on ``triton``: min(w, T); the kernel visits only the key tiles that meet the
      band (tile edges are not counted);
    - banded on ``sdpa`` and ``math`` with w < T <= 2w: the whole (T, T) band mask in one
      call (`ops.scores_whole_band`), T keys per query;
    - banded on ``sdpa`` and ``math`` with T > 2w: ``ops.banded_attention`` cuts the queries
      into ceil(T/b) blocks of b (b = w/2 for even w, else w) and scores each against the
      w + b keys it can see, so (w + b) * ceil(T/b) * b / T keys per query: about 1.5w
      (2w for odd w), never T.
    """
    if backend is not None:
        _check_backend(backend)
    window = config.layer_window(layer)
    if backend is None or window is None or window >= seq_len or backend == "triton":
        return float(attention_context(config, seq_len, layer))
    from minigpt.ops import band_block_size, scores_whole_band  # torch only when a backend is asked for

    if scores_whole_band(seq_len, window):
        return float(seq_len)
    block = band_block_size(window)
    blocks = -(-seq_len // block)
    return float((window + block) * blocks * block) / seq_len


def attention_flops_per_token(config: ModelShape, seq_len: int | None = None, backend: str | None = None) -> float:
    """Forward FLOPs per token of QK^T and AV: 4 * n_embd * context per layer, where context
    is seq_len for dense layers and the band width for banded ones (see `flops_per_token`);
    with `backend`, the context that backend computes (`computed_attention_context`)."""
    T = _seq_len(config, seq_len)
    return sum(4.0 * config.n_embd * computed_attention_context(config, T, i, backend) for i in range(config.n_layer))


def flops_per_token(
    config: ModelShape, seq_len: int | None = None, training: bool = True, backend: str | None = None
) -> float:
    """Matmul FLOPs per token (Kaplan et al. 2020, section 2.1; PaLM appendix B convention).

    Forward: 2 FLOPs per non-embedding parameter (Kaplan's 2N; biases and norms
    included as they are there) and per LM-head weight plus, per layer, 4 * n_embd * context for QK^T and AV, where context is
    seq_len for dense layers and the band width for banded ones (the causal half is not
    subtracted, as in the usual MFU convention). Training is 3x forward (backward is 2x).
    `backend` counts attention as that backend computes it (`computed_attention_context`).
    """
    weights = params(config, non_embedding=True)
    if config.tie_embeddings:  # the LM head is a matmul even when its weight is shared
        weights += config.vocab_size * config.n_embd
    forward = 2.0 * weights + attention_flops_per_token(config, seq_len, backend)
    return 3.0 * forward if training else forward


def step_flops_per_token(config: ModelShape, seq_len: int | None = None, *, lm_head: bool = True,
                         trained: Sequence[int] | None = None, adapters: Sequence[int] | None = None,
                         embeddings_trained: bool = True, head_trained: bool = True) -> float:
    """Matmul FLOPs per token of one training step as it is computed, for MFU.

    `flops_per_token(training=True)` assumes the whole language model trains: 3x forward.
    A fine-tuning step often does less, and counting it as full training overstates MFU
    (a LoRA classifier on a GPT-2-vocabulary model was reported at 110.9%). Here each part
    is counted only where the step computes it:

    - forward: 2 per block parameter, 2 per adapter parameter, attention as in
      `flops_per_token`, and the LM head (2 * vocab * n_embd) only when `lm_head` (a
      classifier reads the last hidden state instead; its n_embd x labels head, once per
      sequence, is left out);
    - backward, input gradients: 2 per weight plus twice the attention forward, through
      every block from the first one that has something to train (gradients never reach
      earlier blocks, nor, when only its adapters train, its q/k/v input), and through
      the LM head when anything before it trains;
    - backward, weight gradients: 2 per trained weight (`trained[i]` of block i, the
      adapters, the LM head when `head_trained`), none for frozen ones.

    trained: per block, the parameters that train (None: every one, `per_block`).
    adapters: per block, LoRA adapter parameters added to it (None: none); they train.
    With the defaults this equals `flops_per_token(config, seq_len, training=True)`.
    Raises ValueError when a per-block list does not have n_layer entries.
    """
    T = _seq_len(config, seq_len)
    L, P = config.n_layer, param_breakdown(config)["per_block"]
    trained = [P] * L if trained is None else list(trained)
    adapters = [0] * L if adapters is None else list(adapters)
    for name, values in (("trained", trained), ("adapters", adapters)):
        if len(values) != L:
            raise ValueError(f"{name} has {len(values)} entries; give one per block (n_layer={L})")
    parts = block_param_breakdown(config)
    qkv = parts["attn.q"] + parts["attn.k"] + parts["attn.v"]
    head = 2.0 * config.vocab_size * config.n_embd if lm_head else 0.0
    total = head
    grad_flows = embeddings_trained
    for i in range(L):
        attention = 4.0 * config.n_embd * attention_context(config, T, i)
        total += 2.0 * P + 2.0 * adapters[i] + attention  # forward
        if grad_flows or trained[i] > 0 or adapters[i] > 0:
            total += 2.0 * P + 2.0 * adapters[i] + 2.0 * attention  # input gradients
            if not grad_flows and trained[i] == 0:  # adapters only, first to train: ln_1 is frozen, so
                total -= 2.0 * qkv                     # nothing needs dL/d(qkv's input)
            total += 2.0 * trained[i] + 2.0 * adapters[i]  # weight gradients
            grad_flows = True
    total += 2.0 * param_breakdown(config)["ln_f"] * (3 if grad_flows else 1)  # Kaplan's 2N includes ln_f
    if lm_head:
        total += head if grad_flows else 0.0  # dL/d(hidden)
        total += head if head_trained else 0.0  # dL/d(weight)
    return total


def training_state_bytes(config: ModelShape, dtype: str = "fp32") -> dict[str, int]:
    """Bytes of the weights, their gradients and AdamW's two moments (m, v), all in `dtype`.

    'fp32' is also what autocast mixed precision keeps (fp32 weights, grads and moments);
    'bf16' is pure bf16 training. Raises ValueError for a dtype not in `DTYPE_BYTES`.
    """
    n, b = params(config), _dtype_bytes(dtype)
    return {"weights": n * b, "gradients": n * b, "adamw": 2 * n * b}


def activation_bytes_per_token(
    config: ModelShape, seq_len: int | None = None, stored_scores: bool = True, backend: str | None = None
) -> int:
    """Activation bytes per token kept for the backward pass, summed over the blocks.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models", section 4.1): one layer stores s*b*h*(34 + 5*a*s/h) bytes with 16-bit
    activations, 1-byte dropout masks and no recomputation. Per token that is
    34*C + 5*H*context; the second term is the (H, T, context) score, softmax and dropout
    tensors, so banded layers count their band. `stored_scores=False` drops it, as a fused
    (flash) attention kernel does. Embeddings and the LM head are not included.

    With `backend`, what that backend keeps: ``math`` stores the scores it computes
    (`computed_attention_context`: about 1.5w per query for a banded layer); ``sdpa`` and
    ``triton`` run fused attention and store none (`stored_scores` is then ignored).
    """
    T = _seq_len(config, seq_len)
    C, H = config.n_embd, config.n_head
    if backend is not None:
        stored_scores = _check_backend(backend) == "math"
    scores = (
        round(sum(5 * H * computed_attention_context(config, T, i, backend) for i in range(config.n_layer)))
        if stored_scores else 0
    )
    return 34 * C * config.n_layer + scores


def training_bytes_lower_bound(config: ModelShape, batch_size: int) -> int:
    """Bytes that one training step of `batch_size` sequences of block_size tokens needs at
    the least: fp32 weights, gradients and AdamW moments, the activations of
    `activation_bytes_per_token` at 16 bits without stored scores (fused attention), and
    one fp32 copy of the logits. Real use is higher (fp32 activations, the logits' gradient,
    the allocator), so a bound above a device's memory means the run cannot fit; a bound
    below it promises nothing."""
    tokens = batch_size * config.block_size
    state = sum(training_state_bytes(config).values())
    return state + tokens * activation_bytes_per_token(config, stored_scores=False) + tokens * config.vocab_size * 4


def kv_cache_bytes(config: ModelShape, seq_len: int | None = None, batch_size: int = 1, dtype: str = "bf16") -> int:
    """Bytes of the keys and values cached for `batch_size` sequences of `seq_len` tokens.

    A dense layer keeps every token; a banded layer keeps at most its window (see
    `minigpt.cache`), so at seq_len=block_size this is what `GPT.new_cache` allocates.
    """
    T = _seq_len(config, seq_len)
    slots = sum(attention_context(config, T, i) for i in range(config.n_layer))
    return 2 * batch_size * config.n_embd * slots * _dtype_bytes(dtype)


def _seq_len(config: ModelShape, seq_len: int | None) -> int:
    if seq_len is None:
        return config.block_size
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or not 1 <= seq_len <= config.block_size:
        raise ValueError(f"seq_len={seq_len!r} must be an integer in [1, block_size={config.block_size}]")
    return int(seq_len)


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; choose one of {BACKENDS}")
    return backend


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]

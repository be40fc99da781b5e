"""Fused Triton kernels for minigpt: flash-style attention and LayerNorm.

This package stands alone: it imports only torch and triton, never ``minigpt``.
Each kernel has a plain-PyTorch twin in ``minigpt_kernels.reference``.

The kernels run on CUDA tensors; on CPU they run only under Triton's interpreter,
which must be selected (``TRITON_INTERPRET=1``) before this package is imported.
"""
from minigpt_kernels.attention import SUPPORTED_HEAD_DIMS as ATTENTION_HEAD_DIMS
from minigpt_kernels.attention import attention
from minigpt_kernels.layer_norm import LayerNorm, layer_norm
from minigpt_kernels.reference import attention_reference, layer_norm_reference

__all__ = ["ATTENTION_HEAD_DIMS", "attention", "layer_norm", "LayerNorm", "attention_reference", "layer_norm_reference"]

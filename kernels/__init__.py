"""Fused Triton kernels for minigpt: flash-style attention and LayerNorm.

This package stands alone: it imports only torch and triton, never ``minigpt``.
"""

"""The multi-scale deformable-attention operator: compiled kernels with the pure-PyTorch reference as fallback."""

from .ms_deform_attn import multi_scale_deformable_attention
from .ms_deform_attn_reference import multi_scale_deformable_attention_reference

__all__ = ["multi_scale_deformable_attention", "multi_scale_deformable_attention_reference"]

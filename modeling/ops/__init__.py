"""The multi-scale deformable-attention operator: compiled kernels with the pure-PyTorch reference as fallback."""

from .ms_deform_attn import (
    EXTENSION_AVAILABLE,
    active_backend,
    compiled_supports,
    extension_status,
    force_reference,
    multi_scale_deformable_attention,
    use_backend,
)
from .ms_deform_attn_reference import multi_scale_deformable_attention_reference

__all__ = [
    "EXTENSION_AVAILABLE",
    "active_backend",
    "compiled_supports",
    "extension_status",
    "force_reference",
    "multi_scale_deformable_attention",
    "multi_scale_deformable_attention_reference",
    "use_backend",
]

"""Mask2Former for universal image segmentation, Hugging Face native.

Public names are imported lazily so that ``import mask2former`` stays cheap and an optional dependency is only
needed by the feature that uses it.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC_API = {
    "Mask2FormerConfig": "mask2former.modeling.configuration_mask2former",
    "Mask2FormerModel": "mask2former.modeling.modeling_mask2former",
    "Mask2FormerForUniversalSegmentation": "mask2former.modeling.modeling_mask2former",
    "Mask2FormerPreTrainedModel": "mask2former.modeling.modeling_mask2former",
    "Mask2FormerImageProcessor": "mask2former.processing.image_processing_mask2former",
    "multi_scale_deformable_attention": "mask2former.modeling.ops",
    "VideoMask2FormerConfig": "mask2former.modeling.configuration_video_mask2former",
    "VideoMask2FormerModel": "mask2former.modeling.modeling_video_mask2former",
    "VideoMask2FormerForVideoSegmentation": "mask2former.modeling.modeling_video_mask2former",
    "SegmenterConfig": "mask2former.modeling.configuration_segmenter",
    "SegmenterModel": "mask2former.modeling.modeling_segmenter",
    "SegmenterForSemanticSegmentation": "mask2former.modeling.modeling_segmenter",
    "SegmenterPreTrainedModel": "mask2former.modeling.modeling_segmenter",
}

__all__ = [*_PUBLIC_API, "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .modeling.configuration_mask2former import Mask2FormerConfig as Mask2FormerConfig
    from .modeling.configuration_segmenter import SegmenterConfig as SegmenterConfig
    from .modeling.configuration_video_mask2former import VideoMask2FormerConfig as VideoMask2FormerConfig
    from .modeling.modeling_mask2former import (
        Mask2FormerForUniversalSegmentation as Mask2FormerForUniversalSegmentation,
    )
    from .modeling.modeling_mask2former import Mask2FormerModel as Mask2FormerModel
    from .modeling.modeling_mask2former import Mask2FormerPreTrainedModel as Mask2FormerPreTrainedModel
    from .modeling.modeling_segmenter import SegmenterForSemanticSegmentation as SegmenterForSemanticSegmentation
    from .modeling.modeling_segmenter import SegmenterModel as SegmenterModel
    from .modeling.modeling_segmenter import SegmenterPreTrainedModel as SegmenterPreTrainedModel
    from .modeling.modeling_video_mask2former import (
        VideoMask2FormerForVideoSegmentation as VideoMask2FormerForVideoSegmentation,
    )
    from .modeling.modeling_video_mask2former import VideoMask2FormerModel as VideoMask2FormerModel
    from .modeling.ops import multi_scale_deformable_attention as multi_scale_deformable_attention
    from .processing.image_processing_mask2former import Mask2FormerImageProcessor as Mask2FormerImageProcessor


def __getattr__(name: str) -> Any:
    if name in _PUBLIC_API:
        value = getattr(import_module(_PUBLIC_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mask2former' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

"""Video Mask2Former configuration: the image model's schema plus one switch, under its own ``model_type``.

The video model has the image model's parameters (frames are a property of the input, not of the architecture), so
its config is ``Mask2FormerConfig`` field for field: an image ``config.json`` (model_type ``mask2former``) loads into
it, and an image checkpoint initialises the video model. The own ``model_type`` keeps a video checkpoint from loading
silently as an image model through the Auto classes.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig

from .configuration_mask2former import Mask2FormerConfig


@strict
class VideoMask2FormerConfig(Mask2FormerConfig):
    r"""Configuration of a video Mask2Former model (Cheng et al., "Mask2Former for Video Instance Segmentation", 2021).

    Every field of [`Mask2FormerConfig`] keeps its meaning and default; ``num_labels`` is the video dataset's classes
    (40 for YouTube-VIS). One field is added:

    Args:
        use_temporal_position_embedding (`bool`, defaults to `True`):
            Add the frame-index sine to the decoder's position embeddings (the paper's 3-D embedding). Without it
            every frame gets the image model's 2-D embedding, the decoder is blind to frame order, and a one-frame
            clip gives exactly the image model's outputs.

    Example:

    ```python
    >>> from mask2former import VideoMask2FormerConfig, VideoMask2FormerForVideoSegmentation
    >>> config = VideoMask2FormerConfig.from_pretrained("hub_configs/video-mask2former-r50-ytvis2019")
    >>> model = VideoMask2FormerForVideoSegmentation(config)
    ```
    """

    model_type = "video_mask2former"

    use_temporal_position_embedding: bool = True

    def __post_init__(self, **kwargs):
        # An image config.json carries model_type "mask2former"; this config stays a video one when it reads it.
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)


# AutoConfig.from_pretrained on a video checkpoint gives this class once it is imported (the model module imports it).
AutoConfig.register(VideoMask2FormerConfig.model_type, VideoMask2FormerConfig, exist_ok=True)

__all__ = ["VideoMask2FormerConfig"]

"""Segmenter configuration: a transformers ``ViTConfig`` for the encoder plus the decoder's few fields.

Segmenter (Strudel, Garcia, Laptev, Schmid, ICCV 2021) shares nothing of Mask2Former's model, so it is its own config
(``model_type`` "segmenter"), not a Mask2Former variant. The encoder *is* transformers' ``ViTModel``, configured by
``encoder_config`` (any ``ViTConfig``: ``google/vit-*`` and non-distilled DeiT configs load as they are). Defaults
reproduce the original repository (rstrudel/segmenter): LayerNorm eps 1e-5 everywhere (its ``nn.LayerNorm``
default), bilinear position-embedding resizing, a 2-layer mask transformer whose width, heads (width / 64) and
FFN (4 x width) follow the encoder, decoder dropout 0.1 (``segm/config.yml``), encoder drop path 0.1
(``segm/train.py``), and a sliding window of the training crop with stride = window (the ADE20K setting).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig, ViTConfig
from transformers.configuration_utils import SubConfigSpec

DECODER_TYPES = ("mask_transformer", "linear")
POSITION_INTERPOLATIONS = ("bilinear", "bicubic")

# Seg-B/16 at 512 x 512 as the original builds it (vit_base_patch16_384 at crop 512, nn.LayerNorm's eps).
_DEFAULT_ENCODER = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "image_size": 512,
    "patch_size": 16,
    "layer_norm_eps": 1e-5,
    "hidden_act": "gelu",
}


@strict
class SegmenterConfig(PreTrainedConfig):
    r"""Configuration of a Segmenter model: ViT encoder + mask-transformer (or linear) decoder, semantic only.

    Args:
        encoder_config (`ViTConfig` or `dict`, *optional*):
            The ViT encoder (transformers' ``ViTConfig``). ``image_size`` is the grid the position embeddings are
            stored for (the original: the training crop); other inputs resize them. Defaults to ViT-B/16 at 512 with
            LayerNorm eps 1e-5 (the original's; timm and mmsegmentation ViTs use 1e-6).
        decoder_type (`str`, defaults to `"mask_transformer"`): `"mask_transformer"` or `"linear"` (one linear
            layer on the patch tokens).
        decoder_layers (`int`, defaults to 2): mask-transformer blocks over patch and class tokens together.
        decoder_hidden_size (`int`, *optional*): mask-transformer width; defaults to the encoder width (the
            original's factory forces it).
        decoder_num_attention_heads (`int`, *optional*): defaults to `decoder_hidden_size // 64`, the original rule.
        decoder_intermediate_size (`int`, *optional*): FFN width; defaults to 4 x `decoder_hidden_size`.
        decoder_dropout (`float`, defaults to 0.1): dropout on the attention weights, projections and FFN of the
            mask transformer (training only).
        decoder_drop_path_rate (`float`, defaults to 0.0): stochastic depth of the mask-transformer blocks, linear
            in depth up to this value.
        decoder_layer_norm_eps (`float`, defaults to 1e-5): eps of the decoder's LayerNorms (blocks,
            ``decoder_norm`` and ``mask_norm`` over the classes).
        encoder_drop_path_rate (`float`, defaults to 0.1): stochastic depth of the ViT blocks, linear in depth up to
            this value (training only; transformers' ViT has none, so it is added around its layers).
        position_embedding_interpolation (`str`, defaults to `"bilinear"`): how the position embeddings are resized
            to another grid: `"bilinear"` (the original) or `"bicubic"` (mmsegmentation, transformers' ViT);
            `align_corners=False`, no antialiasing, the class token's embedding kept.
        window_size (`int`, *optional*): sliding-window inference window; defaults to the encoder's `image_size`.
        window_stride (`int`, *optional*): sliding-window stride; defaults to `window_size`.
        semantic_loss_ignore_index (`int`, defaults to 255): label ignored by the per-pixel cross-entropy.
        initializer_range (`float`, defaults to 0.02): std of the truncated-normal initialisation of the decoder.
        num_labels, id2label, label2id: the classes (``K`` = ``num_labels``; no "no object" class).

    Example:

    ```python
    >>> from transformers import ViTConfig
    >>> from mask2former import SegmenterConfig, SegmenterForSemanticSegmentation
    >>> encoder = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
    ...                     image_size=512, patch_size=16, layer_norm_eps=1e-5)
    >>> config = SegmenterConfig(encoder_config=encoder, num_labels=150)  # Seg-S-Mask/16
    >>> model = SegmenterForSemanticSegmentation(config)
    ```
    """

    model_type = "segmenter"
    sub_configs_defaults = {"encoder_config": SubConfigSpec(ViTConfig, init_kwargs=_DEFAULT_ENCODER)}

    encoder_config: dict | PreTrainedConfig | None = None
    decoder_type: str = "mask_transformer"
    decoder_layers: int = 2
    decoder_hidden_size: int | None = None
    decoder_num_attention_heads: int | None = None
    decoder_intermediate_size: int | None = None
    decoder_dropout: float | int = 0.1
    decoder_drop_path_rate: float | int = 0.0
    decoder_layer_norm_eps: float = 1e-5
    encoder_drop_path_rate: float | int = 0.1
    position_embedding_interpolation: str = "bilinear"
    window_size: int | None = None
    window_stride: int | None = None
    semantic_loss_ignore_index: int = 255
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if isinstance(self.encoder_config, dict):
            # A partial dict (a recipe's) keeps the original's defaults rather than ViTConfig's (eps 1e-12, 224).
            self.encoder_config = {**_DEFAULT_ENCODER, **self.encoder_config}
        super().__post_init__(**kwargs)
        width = self.encoder_config.hidden_size
        self.decoder_hidden_size = self.decoder_hidden_size or width
        self.decoder_num_attention_heads = self.decoder_num_attention_heads or max(1, self.decoder_hidden_size // 64)
        self.decoder_intermediate_size = self.decoder_intermediate_size or 4 * self.decoder_hidden_size

    def validate_architecture(self):
        super().validate_architecture()
        if self.decoder_type not in DECODER_TYPES:
            raise ValueError(f"decoder_type={self.decoder_type!r} is not one of {DECODER_TYPES}.")
        if self.position_embedding_interpolation not in POSITION_INTERPOLATIONS:
            raise ValueError(
                f"position_embedding_interpolation={self.position_embedding_interpolation!r} is not one of "
                f"{POSITION_INTERPOLATIONS} (bilinear: the original Segmenter; bicubic: mmsegmentation)."
            )
        if self.decoder_hidden_size % self.decoder_num_attention_heads:
            raise ValueError(
                f"decoder_hidden_size={self.decoder_hidden_size} is not divisible by "
                f"decoder_num_attention_heads={self.decoder_num_attention_heads}; pick heads that divide the width."
            )
        for name in ("window_size", "window_stride"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be a positive number of pixels (or None for the default).")

    @property
    def patch_size(self) -> int:
        """The encoder's (square) patch size: the stride of the logits."""
        patch_size = self.encoder_config.patch_size
        return int(patch_size if isinstance(patch_size, int) else patch_size[0])

    @property
    def pretraining_grid(self) -> tuple[int, int]:
        """`(rows, cols)` of patches the stored position embeddings cover (``encoder_config.image_size / patch``)."""
        image_size = self.encoder_config.image_size
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        return int(height) // self.patch_size, int(width) // self.patch_size

    @property
    def sliding_window(self) -> tuple[int, int]:
        """`(window, stride)` in pixels of sliding-window inference, defaults resolved."""
        window = self.window_size or self.pretraining_grid[0] * self.patch_size
        return int(window), int(self.window_stride or window)


def _register_auto_config() -> None:
    from transformers import AutoConfig

    AutoConfig.register(SegmenterConfig.model_type, SegmenterConfig, exist_ok=True)


_register_auto_config()

__all__ = ["SegmenterConfig"]

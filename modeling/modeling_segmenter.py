"""Segmenter (Strudel, Garcia, Laptev, Schmid, ICCV 2021), assembled as in the paper's figure:

    pixel_values (B, 3, H, W) [+ pixel_mask (B, H, W)]
      -> zero-pad to a multiple of the patch size p                        (the original's ``padding``)
      -> ViT encoder: transformers' ``ViTModel``, position embeddings resized to the input grid
                                                    tokens (B, 1 + h*w, D), h = ceil(H / p), w = ceil(W / p)
      -> decoder on the patch tokens (mask transformer or linear)          (decoder_mask_transformer.py)
                                                    logits (B, K, h, w)
      -> loss with labels: bilinear to the padded size, cropped, per-pixel cross-entropy

The encoder stays transformers' ``ViTModel`` (so its weights load with ``ViTModel.from_pretrained`` and checkpoints
keep its on-disk names); two things are added around its own modules: the position-embedding resize of the original
(bilinear by default, for any grid, where transformers' is bicubic and square-only) and stochastic depth on each
layer's residual branches (transformers' ViT has none). With ``pixel_mask``, each image runs on its valid region
rounded up to the patch size (images of one size share a call) and the logits are zero-padded back: an image gives
the same logits alone or padded in a batch. ``sliding_window_inference`` is the original's evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, ViTConfig, ViTModel
from transformers import initialization as init
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.models.vit.modeling_vit import ViTEmbeddings
from transformers.utils import ModelOutput

from . import padding
from .configuration_segmenter import SegmenterConfig
from .decoder_mask_transformer import (
    SegmenterDropPath,
    SegmenterLinearDecoder,
    SegmenterMaskTransformer,
    build_decoder,
    drop_path_rates,
)


def resize_position_embeddings(
    position_embeddings: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], mode: str = "bilinear"
) -> torch.Tensor:
    """Resizes ViT position embeddings to another patch grid, as the original Segmenter does.

    The class token's embedding is kept; the grid embeddings are resized as a `(D, rows, cols)` image with
    `align_corners=False` and no antialiasing.

    Args:
        position_embeddings (`torch.Tensor` of shape `(1, 1 + rows * cols, D)`): class token first, grid row-major.
        old_grid (`tuple[int, int]`): `(rows, cols)` the embeddings are stored for.
        new_grid (`tuple[int, int]`): `(rows, cols)` wanted.
        mode (`str`): `"bilinear"` (the original) or `"bicubic"` (mmsegmentation).

    Returns:
        `torch.Tensor` of shape `(1, 1 + new_rows * new_cols, D)`.
    """
    num_grid = old_grid[0] * old_grid[1]
    if position_embeddings.shape[1] != 1 + num_grid:
        raise ValueError(
            f"position embeddings hold {position_embeddings.shape[1]} tokens but a {old_grid[0]}x{old_grid[1]} grid "
            f"plus the class token is {1 + num_grid}; check encoder_config.image_size and patch_size."
        )
    class_embedding, grid_embeddings = position_embeddings[:, :1], position_embeddings[:, 1:]
    width = position_embeddings.shape[-1]
    # (1, rows*cols, D) -> (1, D, rows, cols)
    grid_embeddings = grid_embeddings.reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2)
    grid_embeddings = F.interpolate(grid_embeddings, size=new_grid, mode=mode, align_corners=False)
    # (1, D, rows', cols') -> (1, rows'*cols', D)
    grid_embeddings = grid_embeddings.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], width)
    return torch.cat([class_embedding, grid_embeddings], dim=1)


class SegmenterViTEmbeddings(ViTEmbeddings):
    """transformers' ViT embeddings (same parameters) with Segmenter's position-embedding resize for any grid."""

    def __init__(self, config: ViTConfig, pretraining_grid: tuple[int, int], mode: str) -> None:
        super().__init__(config)
        self.pretraining_grid = pretraining_grid
        self.interpolation_mode = mode

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        patch_size = self.patch_embeddings.patch_size
        grid = (height // patch_size[0], width // patch_size[1])
        # Resized whenever the grid differs; the original compares token counts only, and so skips a 4x16 input
        # with 8x8 stored embeddings, adding them unresized.
        if grid == tuple(self.pretraining_grid):
            return self.position_embeddings
        return resize_position_embeddings(
            self.position_embeddings, self.pretraining_grid, grid, self.interpolation_mode
        )


@dataclass
class SegmenterModelOutput(ModelOutput):
    """Output of the Segmenter encoder.

    Args:
        last_hidden_state (`torch.Tensor` of shape `(B, 1 + h*w, D)`): tokens after the final LayerNorm, class token
            first, then the `h x w` patch grid row-major (`h = ceil(H / p)`, `w = ceil(W / p)`).
        hidden_states (`tuple[torch.Tensor]`, *optional*): the embeddings and each layer's output, `(B, 1 + h*w, D)`
            (without padding only).
        attentions (`tuple[torch.Tensor]`, *optional*): each layer's attention weights (without padding only).
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class SegmenterPreTrainedModel(PreTrainedModel):
    """Weight initialisation and checkpoint plumbing shared by the Segmenter models."""

    config_class = SegmenterConfig
    config: SegmenterConfig
    base_model_prefix = "segmenter"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ViTEmbeddings", "ViTLayer", "SegmenterBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The ViT encoder is initialised by ViTModel's own rules; these are the original decoder's. Each rule is on a
        # module holding parameters of its own, the only ones transformers initialises in models defined outside it.
        std = self.config.initializer_range
        if isinstance(module, SegmenterMaskTransformer):
            init.trunc_normal_(module.cls_emb, std=std)
            scale = module.proj_patch.shape[0] ** -0.5
            init.normal_(module.proj_patch, std=scale)
            init.normal_(module.proj_classes, std=scale)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def _output_flags(
        self, output_hidden_states: bool | None, output_attentions: bool | None, return_dict: bool | None
    ) -> tuple[bool, bool, bool]:
        """The call's output options, the config's where not given."""
        config = self.config
        return (
            config.output_hidden_states if output_hidden_states is None else output_hidden_states,
            config.output_attentions if output_attentions is None else output_attentions,
            config.return_dict if return_dict is None else return_dict,
        )


def pad_to_patches(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Zero-pads `(B, C, H, W)` at the bottom and right to multiples of `patch_size` (the original's padding)."""
    height, width = pixel_values.shape[-2:]
    pad_height, pad_width = -height % patch_size, -width % patch_size
    if pad_height or pad_width:
        pixel_values = F.pad(pixel_values, (0, pad_width, 0, pad_height))
    return pixel_values


def _check_inputs(pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None, num_channels: int) -> None:
    if pixel_values.dim() != 4 or pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"pixel_values must be (batch, {num_channels}, height, width), got shape {tuple(pixel_values.shape)}; "
            "add a batch dimension with pixel_values[None] for a single image."
        )
    batch_size, _, height, width = pixel_values.shape
    if pixel_mask is not None and tuple(pixel_mask.shape) != (batch_size, height, width):
        raise ValueError(
            f"pixel_mask must have shape (batch, height, width) = {(batch_size, height, width)} to match "
            f"pixel_values, got {tuple(pixel_mask.shape)}."
        )


def run_per_valid_region(
    function: Callable[[torch.Tensor], list[torch.Tensor]],
    pixel_values: torch.Tensor,
    pixel_mask: torch.Tensor | None,
    patch_size: int,
) -> list[torch.Tensor]:
    """Runs `function` on each image's valid region rounded up to `patch_size` and zero-pads its maps back.

    Args:
        function: `(B_g, C, h_g, w_g)` pixels -> list of maps `(B_g, C', h_g / s, w_g / s)`.
        pixel_values (`torch.Tensor` of shape `(B, C, H, W)`), pixel_mask (`(B, H, W)`, *optional*).

    Returns:
        the maps for the whole batch `(B, C', ceil(H / p) * p / s, ...)`, zero where an image's region ends. Without
        padding inside the batch this is one call of `function` on the (patch-padded) batch.
    """
    padded = pad_to_patches(pixel_values, patch_size)
    if pixel_mask is not None:
        pixel_mask = pad_to_patches(pixel_mask[:, None], patch_size)[:, 0]  # the patch padding is padding too
    regions = padding.valid_regions(pixel_mask, size_divisor=patch_size)
    return padding.run_per_valid_region(lambda inputs, _: function(inputs[0]), [padded], regions)


class SegmenterModel(SegmenterPreTrainedModel):
    """The Segmenter encoder: transformers' `ViTModel` (no pooler) with the original's position-embedding resize.

    Args:
        config (`SegmenterConfig`).
    """

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__(config)
        encoder_config = config.encoder_config
        self.encoder = ViTModel(encoder_config, add_pooling_layer=False)
        # Same parameters, Segmenter's resize rule; then stochastic depth on every residual branch's output (ViTLayer
        # applies its `dropout` exactly there, before adding the residual).
        self.encoder.embeddings = SegmenterViTEmbeddings(
            encoder_config, config.pretraining_grid, config.position_embedding_interpolation
        )
        rates = drop_path_rates(config.encoder_drop_path_rate, encoder_config.num_hidden_layers)
        for layer, rate in zip(self.encoder.layers, rates):
            layer.dropout = SegmenterDropPath(encoder_config.hidden_dropout_prob, rate)
        self.post_init()

    def encode(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> SegmenterModelOutput:
        """`(B, C, H, W)` with H and W multiples of the patch size -> tokens `(B, 1 + H/p * W/p, D)` (one ViT call)."""
        encoded = self.encoder(
            pixel_values,
            interpolate_pos_encoding=True,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        return SegmenterModelOutput(encoded.last_hidden_state, encoded.hidden_states, encoded.attentions)

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SegmenterModelOutput | tuple:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(B, 3, H, W)`): any size; zero-padded to multiples of the patch.
            pixel_mask (`torch.Tensor` of shape `(B, H, W)`, *optional*): 1 on real pixels, 0 on padding (bottom and
                right). Each image then runs on its own valid region; the class token of an image comes from its run.
            output_hidden_states, output_attentions (`bool`, *optional*): the ViT's per-layer states / attention
                weights (only when no image is padded inside the batch).
            return_dict (`bool`, *optional*): a ModelOutput (default) or a tuple.
        """
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        _check_inputs(pixel_values, pixel_mask, self.config.encoder_config.num_channels)
        patch_size = self.config.patch_size
        captured: list[SegmenterModelOutput] = []

        def encode(pixels: torch.Tensor) -> list[torch.Tensor]:
            output = self.encode(pixels, output_hidden_states, output_attentions)
            captured.append(output)
            tokens = output.last_hidden_state
            grid = (pixels.shape[-2] // patch_size, pixels.shape[-1] // patch_size)
            # class token and grid as maps for the per-region assembly: (B, 1 + h*w, D) -> (B, D, 1, 1), (B, D, h, w)
            cls_map = tokens[:, 0, :, None, None].expand(-1, -1, *grid)
            return [cls_map, tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, *grid)]

        cls_map, grid_map = run_per_valid_region(encode, pixel_values, pixel_mask, patch_size)
        if len(captured) == 1:
            output = captured[0]
        else:
            # (B, D, h, w) -> (B, h*w, D), after the class token of each image
            tokens = torch.cat([cls_map[:, :, :1, :1].flatten(2), grid_map.flatten(2)], dim=2).transpose(1, 2)
            output = SegmenterModelOutput(last_hidden_state=tokens)
        return output if return_dict else output.to_tuple()


def semantic_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, patch_size: int, ignore_index: int
) -> torch.Tensor:
    """Per-pixel cross-entropy of patch logits against `labels (B, H, W)`, as the original trains.

    The logits `(B, K, h, w)` are upsampled bilinearly (`align_corners=False`) to the patch-padded size `(h*p, w*p)`
    and cropped to `(H, W)`; pixels labelled `ignore_index` do not count.
    """
    height, width = labels.shape[-2:]
    if labels.dim() != 3 or logits.shape[-2] * patch_size < height or logits.shape[-1] * patch_size < width:
        raise ValueError(
            f"labels must be (batch, height, width) at the size of pixel_values, got {tuple(labels.shape)} for "
            f"logits {tuple(logits.shape)} at patch size {patch_size}."
        )
    size = (logits.shape[-2] * patch_size, logits.shape[-1] * patch_size)
    upsampled = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[..., :height, :width]
    return F.cross_entropy(upsampled.float(), labels.long(), ignore_index=ignore_index)


def window_anchors(length: int, window: int, stride: int) -> list[int]:
    """Window starts along one axis, as the original: every `stride` while a whole window fits, then flush with the
    end (`length - window`), so the last window may overlap the previous one more."""
    return [start for start in range(0, length, stride) if start < length - window] + [length - window]


class SegmenterForSemanticSegmentation(SegmenterPreTrainedModel):
    """Segmenter: ViT encoder + mask-transformer (or linear) decoder; per-class logits at patch resolution and the
    per-pixel cross-entropy with labels. `Mask2FormerImageProcessor.post_process_semantic_segmentation` turns the
    logits into maps.

    Args:
        config (`SegmenterConfig`).

    Example:

    ```python
    >>> from mask2former import Mask2FormerImageProcessor, SegmenterForSemanticSegmentation
    >>> model = SegmenterForSemanticSegmentation.from_pretrained("path/to/converted-segmenter")
    >>> processor = Mask2FormerImageProcessor.from_pretrained("path/to/converted-segmenter")
    >>> outputs = model(**processor(images=image, return_tensors="pt"))
    >>> outputs.logits.shape  # (1, K, H/16, W/16)
    >>> semantic = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
    ```
    """

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__(config)
        self.segmenter = SegmenterModel(config)
        self.decoder = build_decoder(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput | tuple:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(B, 3, H, W)`): any size; zero-padded to multiples of the patch.
            labels (`torch.LongTensor` of shape `(B, H, W)`, *optional*): class per pixel, `semantic_loss_ignore_index`
                where unknown.
            pixel_mask (`torch.Tensor` of shape `(B, H, W)`, *optional*): 1 on real pixels, 0 on padding; each image
                then runs on its own valid region.
            output_hidden_states, output_attentions (`bool`, *optional*): the encoder's per-layer states / attention
                weights (only when no image is padded inside the batch).
            return_dict (`bool`, *optional*): a ModelOutput (default) or a tuple.

        Returns:
            [`SemanticSegmenterOutput`]: ``logits`` `(B, K, ceil(H/p), ceil(W/p))` and with labels ``loss``.
        """
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        _check_inputs(pixel_values, pixel_mask, self.config.encoder_config.num_channels)
        patch_size = self.config.patch_size

        captured: list[SegmenterModelOutput] = []

        def decode(pixels: torch.Tensor) -> list[torch.Tensor]:
            encoded = self.segmenter.encode(pixels, output_hidden_states, output_attentions)
            captured.append(encoded)
            grid = (pixels.shape[-2] // patch_size, pixels.shape[-1] // patch_size)
            # patch tokens, class token dropped: (B, 1 + h*w, D) -> (B, h*w, D) -> logits (B, K, h, w)
            return [self.decoder(encoded.last_hidden_state[:, 1:], grid)]

        (logits,) = run_per_valid_region(decode, pixel_values, pixel_mask, patch_size)
        hidden_states = captured[0].hidden_states if len(captured) == 1 else None
        attentions = captured[0].attentions if len(captured) == 1 else None

        loss = None
        if labels is not None:
            if tuple(labels.shape) != (pixel_values.shape[0], *pixel_values.shape[-2:]):
                raise ValueError(
                    f"labels must be (batch, height, width) = {(pixel_values.shape[0], *pixel_values.shape[-2:])} "
                    f"like pixel_values, got {tuple(labels.shape)}."
                )
            loss = semantic_cross_entropy(logits, labels, patch_size, self.config.semantic_loss_ignore_index)
        output = SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions)
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def sliding_window_inference(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        window_size: int | None = None,
        window_stride: int | None = None,
        batch_size: int = 4,
    ) -> SemanticSegmenterOutput:
        """The original's evaluation: square windows over each image, logits upsampled to the window and averaged
        where windows overlap.

        Along each axis windows start every `window_stride` pixels and the last one ends flush with the image
        (`segm/model/utils.py`: `sliding_window`, `merge_windows`); a side shorter than the window gets one window
        of its length (the original resizes such images up first; the image processor's resize plays that part).
        When the window covers the image this equals one forward upsampled to the input size.

        Args:
            pixel_values (`torch.Tensor` of shape `(B, 3, H, W)`).
            pixel_mask (`torch.Tensor` of shape `(B, H, W)`, *optional*): windows cover each image's valid region only.
            window_size, window_stride (`int`, *optional*): in pixels; default `config.sliding_window` (the training
                crop, stride = window).
            batch_size (`int`, defaults to 4): windows per forward.

        Returns:
            [`SemanticSegmenterOutput`]: ``logits`` `(B, K, H, W)` at input resolution (0 outside valid regions).
        """
        _check_inputs(pixel_values, pixel_mask, self.config.encoder_config.num_channels)
        default_window, default_stride = self.config.sliding_window
        window = int(window_size or default_window)
        stride = int(window_stride or (window if window_size else default_stride))
        if window < 1 or stride < 1:
            raise ValueError(f"window_size and window_stride must be positive, got {window} and {stride}.")
        num_images, _, height, width = pixel_values.shape
        if pixel_mask is not None:
            mask = pixel_mask.bool()
            valid = torch.stack([mask.any(2).sum(1), mask.any(1).sum(1)], 1).tolist()  # (B, 2) rows, cols
        else:
            valid = [(height, width)] * num_images
        logits = pixel_values.new_zeros(num_images, self.config.num_labels, height, width)
        for index, (valid_height, valid_width) in enumerate(valid):
            window_height, window_width = min(window, valid_height), min(window, valid_width)
            anchors = [
                (top, left)
                for top in window_anchors(valid_height, window_height, stride)
                for left in window_anchors(valid_width, window_width, stride)
            ]
            crops = torch.stack(
                [
                    pixel_values[index, :, top : top + window_height, left : left + window_width]
                    for top, left in anchors
                ]
            )  # (n, 3, window_height, window_width)
            summed = logits.new_zeros(self.config.num_labels, valid_height, valid_width)
            count = logits.new_zeros(1, valid_height, valid_width)
            for start in range(0, len(anchors), batch_size):
                window_logits = self(crops[start : start + batch_size]).logits  # (n', K, h, w)
                size = (
                    window_logits.shape[-2] * self.config.patch_size,
                    window_logits.shape[-1] * self.config.patch_size,
                )
                window_logits = F.interpolate(window_logits, size=size, mode="bilinear", align_corners=False)
                window_logits = window_logits[..., :window_height, :window_width]  # unpad
                for (top, left), values in zip(anchors[start : start + batch_size], window_logits):
                    summed[:, top : top + window_height, left : left + window_width] += values
                    count[:, top : top + window_height, left : left + window_width] += 1
            logits[index, :, :valid_height, :valid_width] = summed / count
        return SemanticSegmenterOutput(logits=logits)


def _register_auto_classes() -> None:
    """`AutoModel` and `AutoModelForSemanticSegmentation` resolve model_type "segmenter" to ours (`AutoConfig` is
    registered by the configuration module)."""
    from transformers import AutoModel, AutoModelForSemanticSegmentation

    AutoModel.register(SegmenterConfig, SegmenterModel, exist_ok=True)
    AutoModelForSemanticSegmentation.register(SegmenterConfig, SegmenterForSemanticSegmentation, exist_ok=True)


_register_auto_classes()

__all__ = [
    "SegmenterForSemanticSegmentation",
    "SegmenterLinearDecoder",
    "SegmenterMaskTransformer",
    "SegmenterModel",
    "SegmenterPreTrainedModel",
    "resize_position_embeddings",
]

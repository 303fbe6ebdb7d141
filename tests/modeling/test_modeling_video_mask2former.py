"""Video Mask2Former: parity with the original video decoder (golden fixture), T = 1 equivalence with the image model,
frame-order behaviour, image checkpoints initialising the video model, save/load, padding and input validation."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForUniversalSegmentation

from mask2former import (
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    VideoMask2FormerConfig,
    VideoMask2FormerForVideoSegmentation,
    VideoMask2FormerModel,
)
from mask2former.commands.convert_detectron2 import rename_to_ours
from mask2former.modeling.video_transformer_decoder import VideoMask2FormerTransformerModule

FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "data" / "oracles" / "video-mask2former-decoder"


def image_config(tiny_config, **overrides) -> Mask2FormerConfig:
    # the shared tiny model with 3 masked-attention layers (every level once), 6 queries and 4 classes
    return tiny_config(**{"decoder_layers": 4, "num_queries": 6, "num_labels": 4, **overrides})


def video_config(tiny_config, use_temporal_position_embedding: bool = True, **overrides) -> VideoMask2FormerConfig:
    fields = image_config(tiny_config, **overrides).to_dict()
    fields.update(model_type="video_mask2former", use_temporal_position_embedding=use_temporal_position_embedding)
    return VideoMask2FormerConfig.from_dict(fields)


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(1e-6)
    error = (actual - expected).abs().max()
    assert error <= rtol * scale, f"{name}: max error {error:.3g} > {rtol} x magnitude {scale:.3g}"


# ---- the golden fixture of the original VideoMultiScaleMaskedTransformerDecoder -------------------------------------


def fixture_decoder() -> tuple[VideoMask2FormerTransformerModule, torch.nn.Linear, dict, dict]:
    settings = json.loads((FIXTURE / "config.json").read_text())
    kwargs = settings["constructor_kwargs"]
    config = VideoMask2FormerConfig(
        feature_size=kwargs["in_channels"],
        hidden_dim=kwargs["hidden_dim"],
        mask_feature_size=kwargs["mask_dim"],
        num_queries=kwargs["num_queries"],
        num_attention_heads=kwargs["nheads"],
        dim_feedforward=kwargs["dim_feedforward"],
        decoder_layers=kwargs["dec_layers"] + 1,  # ours counts the prediction from the learnable queries
        pre_norm=kwargs["pre_norm"],
        num_labels=kwargs["num_classes"],
        enforce_input_projection=kwargs["enforce_input_project"],
    )
    module = VideoMask2FormerTransformerModule(kwargs["in_channels"], config).eval()
    class_head = torch.nn.Linear(kwargs["hidden_dim"], kwargs["num_classes"] + 1)
    # the original's keys as a detectron2 checkpoint holds them, through the converter's rules
    original = load_file(FIXTURE / "state_dict.safetensors")
    assert list(original) == sorted(settings["state_dict_keys_in_order"])
    ours, unknown = rename_to_ours({f"sem_seg_head.predictor.{name}": t.numpy() for name, t in original.items()})
    assert unknown == []
    prefix = "model.transformer_module."
    module.load_state_dict(
        {name[len(prefix) :]: torch.from_numpy(a) for name, a in ours.items() if name.startswith(prefix)}, strict=True
    )
    class_head.load_state_dict(
        {name.split(".")[-1]: torch.from_numpy(a) for name, a in ours.items() if name.startswith("class_predictor.")}
    )
    return module, class_head, load_file(FIXTURE / "inputs.safetensors"), load_file(FIXTURE / "outputs.safetensors")


def test_video_decoder_reproduces_the_original_within_1e_5():
    module, class_head, inputs, expected = fixture_decoder()
    features = [inputs[f"multi_scale_features.{level}"] for level in range(3)]
    with torch.no_grad():
        decoded = module(features, inputs["mask_features"], num_frames=3)
    # (Q, B, C) -> (B, Q, K + 1)
    class_logits = [class_head(state.transpose(0, 1)) for state in decoded.intermediate_hidden_states]
    masks = decoded.masks_queries_logits
    assert len(masks) == 4  # the learnable queries' prediction + one per layer
    assert_close_relative(class_logits[-1], expected["pred_logits"], "pred_logits", 1e-5)
    assert_close_relative(masks[-1], expected["pred_masks"], "pred_masks", 1e-5)
    for index in range(3):
        assert_close_relative(
            class_logits[index], expected[f"aux_outputs.{index}.pred_logits"], f"aux {index} logits", 1e-5
        )
        assert_close_relative(masks[index], expected[f"aux_outputs.{index}.pred_masks"], f"aux {index} masks", 1e-5)
    for level, level_features in enumerate(features):
        height, width = level_features.shape[-2:]
        embedding = module.position_embedder(2, 3, height, width, level_features.device, torch.float32)
        assert_close_relative(embedding, expected[f"pos_embed.{level}"], f"pos_embed.{level}", 1e-6)


def test_fixture_parity_needs_the_temporal_term():
    # the 3-D embedding is what the original computes: without its frame-index term the outputs move far off
    module, class_head, inputs, expected = fixture_decoder()
    module.position_embedder.temporal = False
    features = [inputs[f"multi_scale_features.{level}"] for level in range(3)]
    with torch.no_grad():
        masks = module(features, inputs["mask_features"], num_frames=3).masks_queries_logits[-1]
    assert (masks - expected["pred_masks"]).abs().max() > 1e-2


# ---- the video model against the image model ------------------------------------------------------------------------


def image_twin(video: VideoMask2FormerForVideoSegmentation) -> Mask2FormerForUniversalSegmentation:
    fields = {key: value for key, value in video.config.to_dict().items() if key in Mask2FormerConfig().to_dict()}
    image = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(**fields)).eval()
    image.load_state_dict(video.state_dict(), strict=True)
    return image


def test_state_dict_keys_and_shapes_are_the_image_models(tiny_config):
    video = VideoMask2FormerForVideoSegmentation(video_config(tiny_config))
    image = Mask2FormerForUniversalSegmentation(image_config(tiny_config))
    video_shapes = {name: tuple(t.shape) for name, t in video.state_dict().items()}
    image_shapes = {name: tuple(t.shape) for name, t in image.state_dict().items()}
    assert video_shapes == image_shapes


def test_one_frame_clip_without_temporal_term_equals_the_image_model_exactly(tiny_config):
    video = VideoMask2FormerForVideoSegmentation(
        video_config(tiny_config, use_temporal_position_embedding=False)
    ).eval()
    image = image_twin(video)
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = image(pixel_values, output_auxiliary_logits=True)
        clip = video(pixel_values[:, None], output_auxiliary_logits=True)
    assert clip.masks_queries_logits.shape == (2, 6, 1, 16, 24)
    assert torch.equal(clip.class_queries_logits, expected.class_queries_logits)
    assert torch.equal(clip.masks_queries_logits[:, :, 0], expected.masks_queries_logits)
    for ours, theirs in zip(clip.auxiliary_logits, expected.auxiliary_logits, strict=True):
        assert torch.equal(ours["class_queries_logits"], theirs["class_queries_logits"])
        assert torch.equal(ours["masks_queries_logits"][:, :, 0], theirs["masks_queries_logits"])


def test_one_frame_clip_with_the_temporal_term_matches_the_image_model_to_rounding(tiny_config):
    # with T = 1 the frame-index term adds one constant vector to every key, which the softmax cancels: equal up to
    # float rounding, not bit for bit
    video = VideoMask2FormerForVideoSegmentation(video_config(tiny_config)).eval()
    image = image_twin(video)
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        clip, expected = video(pixel_values[:, None]), image(pixel_values)
    assert_close_relative(clip.class_queries_logits, expected.class_queries_logits, "class logits", 1e-5)
    assert_close_relative(clip.masks_queries_logits[:, :, 0], expected.masks_queries_logits, "masks", 1e-5)


def test_permuting_frames_permutes_the_tubes_without_the_temporal_term(tiny_config):
    video = VideoMask2FormerForVideoSegmentation(
        video_config(tiny_config, use_temporal_position_embedding=False)
    ).eval()
    clip = torch.randn(1, 4, 3, 64, 64)
    order = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        outputs = video(clip)
        permuted = video(clip[:, order])
    assert_close_relative(permuted.class_queries_logits, outputs.class_queries_logits, "class logits", 1e-5)
    assert_close_relative(permuted.masks_queries_logits, outputs.masks_queries_logits[:, :, order], "tubes", 1e-5)


def test_the_temporal_term_makes_the_decoder_see_frame_order(tiny_config):
    video = VideoMask2FormerForVideoSegmentation(video_config(tiny_config)).eval()
    clip = torch.randn(1, 4, 3, 64, 64)
    order = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        outputs = video(clip)
        permuted = video(clip[:, order])
    assert (permuted.masks_queries_logits - outputs.masks_queries_logits[:, :, order]).abs().max() > 1e-3


def test_outputs_shapes_and_auxiliary_predictions(tiny_config):
    video = VideoMask2FormerForVideoSegmentation(video_config(tiny_config)).eval()
    with torch.no_grad():
        outputs = video(torch.randn(2, 3, 3, 64, 96), output_auxiliary_logits=True, output_hidden_states=True)
    assert outputs.class_queries_logits.shape == (2, 6, 5)
    assert outputs.masks_queries_logits.shape == (2, 6, 3, 16, 24)
    assert len(outputs.auxiliary_logits) == 3
    for auxiliary in outputs.auxiliary_logits:
        assert auxiliary["masks_queries_logits"].shape == (2, 6, 3, 16, 24)
        assert auxiliary["class_queries_logits"].shape == (2, 6, 5)
    # per-frame maps stay frame-major
    assert outputs.pixel_decoder_last_hidden_state.shape == (6, 32, 16, 24)
    assert len(outputs.transformer_decoder_hidden_states) == 4


# ---- checkpoints -------------------------------------------------------------------------------------------------


def test_image_checkpoint_initialises_the_video_model(tmp_path, tiny_config):
    image = Mask2FormerForUniversalSegmentation(image_config(tiny_config))
    image.save_pretrained(tmp_path)
    video = VideoMask2FormerForVideoSegmentation.from_pretrained(tmp_path)
    assert video.config.model_type == "video_mask2former"
    image_weights, video_weights = image.state_dict(), video.state_dict()
    assert set(image_weights) == set(video_weights)
    for name, tensor in image_weights.items():
        assert torch.equal(video_weights[name], tensor), name


def test_image_checkpoint_with_other_classes_resizes_the_class_head(tmp_path, tiny_config):
    image = Mask2FormerForUniversalSegmentation(image_config(tiny_config, num_labels=4))
    image.save_pretrained(tmp_path)
    video = VideoMask2FormerForVideoSegmentation.from_pretrained(tmp_path, num_labels=7, ignore_mismatched_sizes=True)
    assert video.class_predictor.weight.shape == (8, 32)
    assert video.config.num_labels == 7
    assert torch.equal(video.criterion.empty_weight, torch.tensor([1.0] * 7 + [0.1]))
    resized = {"class_predictor.weight", "class_predictor.bias", "criterion.empty_weight"}
    video_weights = video.state_dict()
    for name, tensor in image.state_dict().items():
        if name not in resized:
            assert torch.equal(video_weights[name], tensor), name
    assert video_weights["class_predictor.weight"].std() > 0  # initialised, not left empty


def test_save_and_load_round_trip_through_the_auto_classes(tmp_path, tiny_config):
    video = VideoMask2FormerForVideoSegmentation(video_config(tiny_config)).eval()
    video.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "video_mask2former"
    assert saved["architectures"] == ["VideoMask2FormerForVideoSegmentation"]
    assert isinstance(AutoConfig.from_pretrained(tmp_path), VideoMask2FormerConfig)
    assert type(AutoModel.from_pretrained(tmp_path)) is VideoMask2FormerModel
    loaded = AutoModelForUniversalSegmentation.from_pretrained(tmp_path).eval()
    assert type(loaded) is VideoMask2FormerForVideoSegmentation
    clip = torch.randn(1, 2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(clip).masks_queries_logits, video(clip).masks_queries_logits)


# ---- padding and inputs ------------------------------------------------------------------------------------------


def test_a_clip_gives_the_same_tubes_alone_and_padded_in_a_batch(tiny_config):
    video = VideoMask2FormerForVideoSegmentation(video_config(tiny_config)).eval()
    small = torch.randn(1, 2, 3, 64, 64)
    batch = torch.zeros(2, 2, 3, 96, 128)
    batch[0, :, :, :64, :64] = small[0]
    batch[1] = torch.randn(2, 3, 96, 128)
    pixel_mask = torch.zeros(2, 96, 128, dtype=torch.long)
    pixel_mask[0, :64, :64] = 1
    pixel_mask[1] = 1
    with torch.no_grad():
        alone = video(small)
        batched = video(batch, pixel_mask=pixel_mask)
    assert_close_relative(batched.class_queries_logits[:1], alone.class_queries_logits, "class logits", 1e-4)
    assert_close_relative(
        batched.masks_queries_logits[:1, :, :, :16, :16], alone.masks_queries_logits, "tubes in the valid region", 1e-4
    )


def test_tube_loss_trains_the_model(tiny_config):
    video = VideoMask2FormerForVideoSegmentation(video_config(tiny_config)).train()
    clip = torch.randn(2, 3, 3, 64, 64)
    masks = [torch.zeros(2, 3, 64, 64), torch.zeros(1, 3, 64, 64)]
    masks[0][0, :, 8:40, 8:40] = 1
    masks[0][1, 1:, 30:60, 20:50] = 1  # absent from frame 0
    masks[1][0, :, 10:50, 10:30] = 1
    classes = [torch.tensor([0, 2]), torch.tensor([3])]
    outputs = video(clip, mask_labels=masks, class_labels=classes)
    assert set(outputs.loss_dict) >= {"loss_cross_entropy", "loss_mask", "loss_dice", "loss_dice_2"}
    assert torch.isclose(outputs.loss, sum(outputs.loss_dict.values()))
    outputs.loss.backward()
    assert next(video.model.pixel_level_module.encoder.parameters()).grad.abs().sum() > 0


@pytest.mark.parametrize(
    "shape, mask_shape, message",
    [
        ((2, 3, 64, 64), None, "must be 5-D"),
        ((1, 2, 3, 60, 64), None, "multiples of 32"),
        ((1, 2, 4, 64, 64), None, "channels"),
        ((1, 2, 3, 64, 64), (2, 64, 64), "one mask per clip"),
    ],
)
def test_bad_inputs_raise_value_errors(shape, mask_shape, message, tiny_config):
    video = VideoMask2FormerForVideoSegmentation(video_config(tiny_config)).eval()
    pixel_mask = None if mask_shape is None else torch.ones(mask_shape)
    with pytest.raises(ValueError, match=message):
        video(torch.randn(shape), pixel_mask=pixel_mask)


def test_frame_masks_as_tube_targets_are_a_clear_error(tiny_config):
    video = VideoMask2FormerForVideoSegmentation(video_config(tiny_config)).train()
    with pytest.raises(ValueError, match=r"\(num_targets, num_frames, height, width\)"):
        video(torch.randn(1, 2, 3, 64, 64), mask_labels=[torch.zeros(1, 64, 64)], class_labels=[torch.tensor([0])])

"""Mask2Former model: parity with transformers on the same weights, checkpoint compatibility both ways, padding
invariance, gradient checkpointing, initialisation, the loss path and input validation."""

import pytest
import torch
import transformers
from transformers import Mask2FormerConfig as ReferenceConfig
from transformers import Mask2FormerForUniversalSegmentation as ReferenceModel
from transformers import SwinConfig
from transformers.initialization import no_init_weights

from mask2former import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerModel

STAGES = ["stage1", "stage2", "stage3", "stage4"]


# Deeper than the shared tiny model: 2 encoder layers, and 4 masked-attention layers so that every feature level is
# attended and there are auxiliary predictions to compare.
DEEPER = dict(encoder_layers=2, decoder_layers=5, num_queries=6, num_labels=4, train_num_points=256)


@pytest.fixture(scope="session")
def model_config(tiny_config):
    """``model_config(backbone="swin", **overrides)``: the shared tiny config with ``DEEPER``."""
    return lambda backbone="swin", **overrides: tiny_config(backbone, **{**DEEPER, **overrides})


def reference_twin(model: Mask2FormerForUniversalSegmentation) -> ReferenceModel:
    """transformers' model with our model's weights."""
    reference = ReferenceModel(ReferenceConfig.from_dict(model.config.to_dict())).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    return reference


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = 1e-4) -> None:
    # within rtol of the tensor's magnitude (max |expected|), as the issue states the tolerance
    scale = expected.abs().max().clamp_min(1e-6)
    error = (actual - expected).abs().max()
    assert error <= rtol * scale, f"{name}: max error {error:.3g} > {rtol} x magnitude {scale:.3g}"


def assert_predictions_equal(ours, reference, rtol: float = 1e-4) -> None:
    assert_close_relative(ours.class_queries_logits, reference.class_queries_logits, "class_queries_logits", rtol)
    assert_close_relative(ours.masks_queries_logits, reference.masks_queries_logits, "masks_queries_logits", rtol)
    assert len(ours.auxiliary_logits) == len(reference.auxiliary_logits)
    for index, (mine, theirs) in enumerate(zip(ours.auxiliary_logits, reference.auxiliary_logits)):
        for key in ("class_queries_logits", "masks_queries_logits"):
            assert_close_relative(mine[key], theirs[key], f"auxiliary_logits[{index}][{key}]", rtol)


@pytest.mark.parametrize("backbone", ["swin", "resnet"])
def test_outputs_equal_transformers_on_same_weights(backbone, model_config):
    model = Mask2FormerForUniversalSegmentation(model_config(backbone)).eval()
    reference = reference_twin(model)
    pixel_values = torch.randn(2, 3, 64, 96)  # batch 2, non-square
    options = dict(output_auxiliary_logits=True, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        ours, theirs = model(pixel_values, **options), reference(pixel_values, **options)
    assert ours.class_queries_logits.shape == (2, 6, 5)
    assert ours.masks_queries_logits.shape == (2, 6, 16, 24)
    assert len(ours.auxiliary_logits) == 4
    assert_predictions_equal(ours, theirs)
    # the hidden states transformers returns, in its layouts
    for name in ("encoder_hidden_states", "pixel_decoder_hidden_states", "transformer_decoder_hidden_states"):
        assert len(getattr(ours, name)) == len(getattr(theirs, name)), name
        for index, (mine, their) in enumerate(zip(getattr(ours, name), getattr(theirs, name))):
            assert_close_relative(mine, their, f"{name}[{index}]")
    # the decoder's self-attention weights (B, heads, Q, Q) per layer
    assert len(ours.attentions) == len(theirs.attentions) == 4
    for index, (mine, their) in enumerate(zip(ours.attentions, theirs.attentions)):
        assert_close_relative(mine, their, f"attentions[{index}]")
    for name in (
        "encoder_last_hidden_state",
        "pixel_decoder_last_hidden_state",
        "transformer_decoder_last_hidden_state",
    ):
        assert_close_relative(getattr(ours, name), getattr(theirs, name), name)


def test_model_outputs_equal_transformers_base_model(model_config):
    config = model_config()
    model = Mask2FormerModel(config).eval()
    reference = transformers.Mask2FormerModel(ReferenceConfig.from_dict(config.to_dict())).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    pixel_values = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        ours = model(pixel_values)
        # transformers returns the per-layer query states only with output_hidden_states; we always do (the heads
        # need them)
        theirs = reference(pixel_values, output_hidden_states=True)
    for mine, their in zip(ours.masks_queries_logits, theirs.masks_queries_logits):
        assert_close_relative(mine, their, "masks_queries_logits")
    for mine, their in zip(
        ours.transformer_decoder_intermediate_states, theirs.transformer_decoder_intermediate_states
    ):
        assert_close_relative(mine, their, "transformer_decoder_intermediate_states")


@pytest.mark.parametrize("backbone", ["swin", "resnet"])
def test_state_dicts_load_both_ways_strictly(backbone, model_config):
    config = model_config(backbone)
    ours = Mask2FormerForUniversalSegmentation(config)
    theirs = ReferenceModel(ReferenceConfig.from_dict(config.to_dict()))
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


def test_save_and_load_round_trips_with_transformers(tmp_path, model_config):
    model = Mask2FormerForUniversalSegmentation(model_config()).eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values)

    # ours -> transformers
    model.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "model.safetensors").is_file()
    reference, info = ReferenceModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert reference.config.model_type == "mask2former"
    with torch.no_grad():
        assert_close_relative(
            reference.eval()(pixel_values).class_queries_logits, expected.class_queries_logits, "cls"
        )

    # transformers -> ours
    reference.save_pretrained(tmp_path / "theirs")
    loaded, info = Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path / "theirs", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert isinstance(loaded.config, Mask2FormerConfig)
    with torch.no_grad():
        got = loaded.eval()(pixel_values)
    torch.testing.assert_close(got.class_queries_logits, expected.class_queries_logits, rtol=0, atol=0)
    torch.testing.assert_close(got.masks_queries_logits, expected.masks_queries_logits, rtol=0, atol=0)

    # ours -> ours: every tensor identical
    loaded_again = Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path / "ours")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded_again.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_config_round_trip_and_schema(tmp_path, model_config):
    config = model_config("resnet", num_queries=11, class_weight=3.0)
    assert config.to_dict().keys() == ReferenceConfig().to_dict().keys()
    assert Mask2FormerConfig().to_dict() == ReferenceConfig().to_dict()  # same defaults
    config.save_pretrained(tmp_path)
    loaded = Mask2FormerConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.backbone_config.model_type == "resnet"
    assert Mask2FormerConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_no_swin_only_warning_for_other_backbones(monkeypatch, model_config):
    from transformers.models.mask2former import configuration_mask2former as reference_module

    warnings = []
    monkeypatch.setattr(reference_module.logger, "warning_once", lambda message, *args: warnings.append(message))
    model_config("resnet")
    assert warnings == []
    ReferenceConfig.from_dict(model_config("resnet").to_dict())  # the reference does warn: the probe works
    assert len(warnings) == 1 and "Supported model types" in warnings[0]


def test_timm_backbone_fails_at_use_with_install_hint():
    config = Mask2FormerConfig(backbone="resnet18", use_timm_backbone=True)
    assert config.backbone_config.model_type == "timm_backbone"  # building the config works
    with pytest.raises(ImportError, match="pip install timm"):
        Mask2FormerForUniversalSegmentation(config)


def padded_batch_case(config: Mask2FormerConfig):
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    # the small image alone, as the processor gives it: 50x70 valid, padded to 64x96
    small = torch.zeros(1, 3, 64, 96)
    small[..., :50, :70] = torch.randn(1, 3, 50, 70)
    small_mask = torch.zeros(1, 64, 96, dtype=torch.long)
    small_mask[:, :50, :70] = 1
    # the same image in a batch with a larger one, padded to 128x160
    large = torch.randn(1, 3, 128, 160)
    batch = torch.zeros(2, 3, 128, 160)
    batch[0, :, :64, :96] = small[0]
    batch[1] = large[0]
    batch_mask = torch.zeros(2, 128, 160, dtype=torch.long)
    batch_mask[0, :50, :70] = 1
    batch_mask[1] = 1
    return model, small, small_mask, large, batch, batch_mask


@pytest.mark.parametrize("backbone", ["swin", "resnet"])
def test_padding_invariance_alone_vs_batched_with_larger_image(backbone, model_config):
    model, small, small_mask, large, batch, batch_mask = padded_batch_case(model_config(backbone))
    with torch.no_grad():
        alone = model(small, pixel_mask=small_mask, output_auxiliary_logits=True)
        batched = model(batch, pixel_mask=batch_mask, output_auxiliary_logits=True)
        large_alone = model(large)

    def valid(masks):  # the small image's region at stride 4 (its padded size 64x96 -> 16x24)
        return masks[0, :, :16, :24]

    assert_close_relative(batched.class_queries_logits[0], alone.class_queries_logits[0], "class_queries_logits")
    assert_close_relative(valid(batched.masks_queries_logits), valid(alone.masks_queries_logits), "masks")
    for index, (mine, theirs) in enumerate(zip(batched.auxiliary_logits, alone.auxiliary_logits)):
        assert_close_relative(mine["class_queries_logits"][0], theirs["class_queries_logits"][0], f"aux{index} cls")
        assert_close_relative(valid(mine["masks_queries_logits"]), valid(theirs["masks_queries_logits"]), "aux mask")
    # the unpadded image is unaffected by its padded neighbour
    assert_close_relative(batched.class_queries_logits[1], large_alone.class_queries_logits[0], "large cls")
    assert_close_relative(batched.masks_queries_logits[1], large_alone.masks_queries_logits[0], "large masks")


def test_padding_changes_transformers_but_not_us(model_config):
    """Deliberate difference (transformers#39382): transformers ignores pixel_mask, so the padding leaks."""
    model, small, small_mask, _, batch, batch_mask = padded_batch_case(model_config("swin"))
    reference = reference_twin(model)
    with torch.no_grad():
        reference_alone = reference(small, pixel_mask=small_mask).class_queries_logits[0]
        reference_batched = reference(batch, pixel_mask=batch_mask).class_queries_logits[0]
    assert (reference_alone - reference_batched).abs().max() > 1e-3 * reference_alone.abs().max()


def test_padded_batch_trains(model_config):
    """Gradients flow through the per-size path (crops, zero-padded maps, masked attention) and are finite."""
    model, _, _, _, batch, batch_mask = padded_batch_case(model_config("resnet"))
    model.train()
    mask_labels = [torch.zeros(1, 128, 160), (torch.rand(2, 128, 160) > 0.5).float()]
    mask_labels[0][0, :30, :40] = 1
    outputs = model(
        batch,
        pixel_mask=batch_mask,
        mask_labels=mask_labels,
        class_labels=[torch.tensor([1]), torch.tensor([0, 2])],
    )
    outputs.loss.backward()
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(gradients) > 50 and all(torch.isfinite(g).all() for g in gradients)
    assert model.model.pixel_level_module.encoder.embedder.embedder.convolution.weight.grad.abs().sum() > 0


def test_all_valid_pixel_mask_is_the_unpadded_path(model_config):
    model = Mask2FormerForUniversalSegmentation(model_config()).eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        without = model(pixel_values)
        with_mask = model(pixel_values, pixel_mask=torch.ones(2, 64, 64, dtype=torch.long))
    torch.testing.assert_close(with_mask.masks_queries_logits, without.masks_queries_logits, rtol=0, atol=0)


def test_same_size_padded_images_share_one_backbone_call(model_config):
    model = Mask2FormerForUniversalSegmentation(model_config()).eval()
    pixel_values = torch.randn(3, 3, 64, 96)
    pixel_mask = torch.ones(3, 64, 96, dtype=torch.long)
    pixel_mask[0, 40:] = 0  # rounds up to 64x96: same group as the full images
    pixel_mask[1, :, 60:] = 0  # rounds up to 64x64: its own group
    batch_sizes = []
    handle = model.model.pixel_level_module.encoder.register_forward_pre_hook(
        lambda module, args: batch_sizes.append(tuple(args[0].shape))
    )
    with torch.no_grad():
        model(pixel_values, pixel_mask=pixel_mask)
    handle.remove()
    assert sorted(batch_sizes) == [(1, 3, 64, 64), (2, 3, 64, 96)]


def test_gradient_checkpointing_gives_the_same_gradients(model_config):
    config = model_config(backbone="resnet")
    model = Mask2FormerForUniversalSegmentation(config).train()
    pixel_values = torch.randn(2, 3, 64, 64)

    def gradients():
        model.zero_grad()
        outputs = model(pixel_values, output_auxiliary_logits=True)
        total = outputs.class_queries_logits.square().sum() + outputs.masks_queries_logits.square().mean()
        for auxiliary in outputs.auxiliary_logits:
            total = total + auxiliary["masks_queries_logits"].square().mean()
        total.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(1)
    plain = gradients()
    model.gradient_checkpointing_enable()
    checkpointed_layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert len(checkpointed_layers) >= config.encoder_layers + config.decoder_layers - 1
    torch.manual_seed(1)
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) > 50
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_loss_is_the_weighted_sum_of_the_loss_terms(model_config):
    config = model_config(train_num_points=64)
    # eval mode: in train mode the backbone's (zero-rate) dropouts draw random numbers, shifting the loss' samples
    model = Mask2FormerForUniversalSegmentation(config).eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    mask_labels = [(torch.rand(2, 64, 64) > 0.5).float(), (torch.rand(1, 64, 64) > 0.5).float()]
    class_labels = [torch.tensor([0, 3]), torch.tensor([2])]
    outputs = model(pixel_values, mask_labels=mask_labels, class_labels=class_labels)
    num_predictions = config.decoder_layers
    assert len(outputs.loss_dict) == 3 * num_predictions
    assert {"loss_cross_entropy", "loss_mask", "loss_dice", "loss_dice_0"} <= outputs.loss_dict.keys()
    torch.testing.assert_close(outputs.loss, sum(outputs.loss_dict.values()))

    # the terms are the criterion's, weighted by the config's weights
    torch.manual_seed(0)
    outputs = model(pixel_values, mask_labels=mask_labels, class_labels=class_labels, output_auxiliary_logits=True)
    torch.manual_seed(0)
    raw = model.criterion(
        outputs.masks_queries_logits,
        outputs.class_queries_logits,
        mask_labels,
        class_labels,
        auxiliary_predictions=outputs.auxiliary_logits,
    )
    weights = {"loss_cross_entropy": config.class_weight, "loss_mask": config.mask_weight, "loss_dice": 5.0}
    for name, value in raw.items():
        weight = next(w for key, w in weights.items() if name.startswith(key))
        torch.testing.assert_close(outputs.loss_dict[name], value * weight, msg=name)
    outputs.loss.backward()
    assert model.class_predictor.weight.grad is not None and model.class_predictor.weight.grad.abs().sum() > 0


def test_initialisation_matches_transformers_statistics(model_config):
    """Same rule per tensor as transformers' _init_weights: constants equal, random tensors of the same law."""
    config = model_config("resnet", hidden_dim=64, feature_size=64, mask_feature_size=64)
    ours = Mask2FormerForUniversalSegmentation(config).state_dict()
    theirs = ReferenceModel(ReferenceConfig.from_dict(config.to_dict())).state_dict()
    checked = 0
    for key, expected in theirs.items():
        actual, expected = ours[key].double(), expected.double()
        if expected.numel() == 1 or expected.std() == 0 or "sampling_offsets.bias" in key:
            # constants: zeros, ones, the deformable offsets' rings, the class weights
            torch.testing.assert_close(actual, expected, msg=key)
        elif expected.numel() >= 256:
            spread = expected.std()
            assert abs(actual.std() - spread) <= 0.15 * spread, key
            assert abs(actual.mean() - expected.mean()) <= 6 * spread / expected.numel() ** 0.5, key
            checked += 1
    assert checked > 40


@pytest.mark.parametrize(
    "shape, mask_shape, message",
    [
        ((3, 64, 64), None, "4-D"),
        ((1, 1, 64, 64), None, "channels"),
        ((1, 3, 64, 70), None, "multiples of 32"),
        ((1, 3, 64, 64), (1, 64, 32), "pixel_mask must have shape"),
    ],
)
def test_bad_inputs_raise_value_errors(shape, mask_shape, message, model_config):
    model = Mask2FormerForUniversalSegmentation(model_config()).eval()
    pixel_mask = None if mask_shape is None else torch.ones(mask_shape)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(shape), pixel_mask=pixel_mask)


def test_labels_must_come_together(model_config):
    model = Mask2FormerForUniversalSegmentation(model_config()).eval()
    with pytest.raises(ValueError, match="mask_labels and class_labels"):
        model(torch.randn(1, 3, 64, 64), mask_labels=[torch.zeros(1, 64, 64)])


def test_empty_pixel_mask_raises(model_config):
    model = Mask2FormerForUniversalSegmentation(model_config()).eval()
    pixel_mask = torch.ones(2, 64, 64)
    pixel_mask[1] = 0
    with pytest.raises(ValueError, match=r"pixel_mask\[1\] has no valid pixel"):
        model(torch.randn(2, 3, 64, 64), pixel_mask=pixel_mask)


@pytest.mark.slow
def test_full_size_swin_tiny_coco_panoptic_equals_transformers():
    """Swin-T COCO-panoptic size on one 384x384 image, in float64.

    In float32 the two implementations differ by ~1e-6 relative (SDPA vs explicit softmax), and at this size a few
    of the ~2 million thresholded mask logits that form the attention masks lie within that distance of 0 and flip,
    moving a query's later outputs by ~5e-4. float64 removes the flips, so the comparison tests the function itself.
    """
    backbone = SwinConfig(
        embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, out_features=STAGES
    )
    config = Mask2FormerConfig(backbone_config=backbone, num_queries=100, num_labels=133)
    model = Mask2FormerForUniversalSegmentation(config).eval().double()
    with no_init_weights():  # its weights are overwritten by ours
        reference = ReferenceModel(ReferenceConfig.from_dict(config.to_dict())).eval().double()
    reference.load_state_dict(model.state_dict(), strict=True)
    pixel_values = torch.randn(1, 3, 384, 384, dtype=torch.float64)
    with torch.no_grad():
        ours = model(pixel_values, output_auxiliary_logits=True)
        theirs = reference(pixel_values, output_auxiliary_logits=True)
    assert ours.class_queries_logits.shape == (1, 100, 134)
    assert ours.masks_queries_logits.shape == (1, 100, 96, 96)
    assert len(ours.auxiliary_logits) == 9
    assert_predictions_equal(ours, theirs)


def test_real_images_through_the_processor_alone_and_batched(coco_sample_root, model_config):
    """Two COCO images of different sizes: each image's outputs are the same alone and in the padded batch."""
    from PIL import Image

    from mask2former import Mask2FormerImageProcessor

    paths = sorted((coco_sample_root / "val2017").glob("*.jpg"))
    images = [
        Image.open(paths[0]).convert("RGB").resize((100, 70)),
        Image.open(paths[1]).convert("RGB").resize((200, 150)),
    ]
    processor = Mask2FormerImageProcessor(do_resize=False)
    batch = processor(images=images, return_tensors="pt")
    assert batch["pixel_values"].shape[-2:] == (160, 224)
    model = Mask2FormerForUniversalSegmentation(model_config("swin")).eval()
    with torch.no_grad():
        batched = model(**batch)
        for index, image in enumerate(images):
            alone = model(**processor(images=[image], return_tensors="pt"))
            height, width = alone.masks_queries_logits.shape[-2:]  # image 0: 96x128 input -> 24x32
            assert_close_relative(batched.class_queries_logits[index], alone.class_queries_logits[0], f"cls {index}")
            assert_close_relative(
                batched.masks_queries_logits[index, :, :height, :width], alone.masks_queries_logits[0], f"mask {index}"
            )


def test_deformable_attention_gets_fp32_locations_under_mixed_precision(monkeypatch, tiny_config):
    """Under bf16 autocast the sampling locations stay fp32 (bf16 loses whole pixels over a map), so the op runs in
    fp32 while the projections around it run in bf16."""
    import mask2former.modeling.pixel_decoder as pixel_decoder

    model = Mask2FormerForUniversalSegmentation(tiny_config("resnet")).eval()
    seen = []
    original = pixel_decoder.multi_scale_deformable_attention

    def spy(value, spatial_shapes, sampling_locations, attention_weights):
        seen.append((value.dtype, sampling_locations.dtype))
        return original(value, spatial_shapes, sampling_locations, attention_weights)

    monkeypatch.setattr(pixel_decoder, "multi_scale_deformable_attention", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(torch.randn(1, 3, 64, 64))
    assert seen and all(value == torch.bfloat16 and locations == torch.float32 for value, locations in seen), seen
    assert torch.isfinite(outputs.masks_queries_logits).all()


HIDDEN_STATE_FIELDS = (
    "encoder_last_hidden_state",
    "pixel_decoder_last_hidden_state",
    "transformer_decoder_last_hidden_state",
    "encoder_hidden_states",
    "pixel_decoder_hidden_states",
    "transformer_decoder_hidden_states",
)


def _retained_hidden_states(outputs) -> dict[str, torch.Tensor]:
    states = {}
    for name in HIDDEN_STATE_FIELDS:
        value = getattr(outputs, name)
        for index, state in enumerate(value if isinstance(value, tuple) else (value,)):
            state.retain_grad()
            states[f"{name}[{index}]"] = state
    return states


def _objective(outputs) -> torch.Tensor:
    return outputs.class_queries_logits.square().sum() + outputs.masks_queries_logits.square().mean()


def test_returned_hidden_states_are_on_the_autograd_path_as_in_transformers(model_config):
    """retain_grad() on every returned hidden state gives its gradient: the tensors are the ones computed on, not
    copies. Where transformers' are on its path too, the gradients are equal on the same weights."""
    model = Mask2FormerForUniversalSegmentation(model_config("swin")).eval()
    reference = reference_twin(model)
    pixel_values = torch.randn(2, 3, 64, 96)
    ours = model(pixel_values, output_hidden_states=True)
    theirs = reference(pixel_values, output_hidden_states=True)
    our_states, their_states = _retained_hidden_states(ours), _retained_hidden_states(theirs)
    _objective(ours).backward()
    _objective(theirs).backward()
    compared = 0
    for name, state in our_states.items():
        assert state.grad is not None and state.grad.abs().sum() > 0, f"{name} is not on the autograd path"
        their_grad = their_states[name].grad
        if their_grad is not None:  # transformers' transformer_decoder_last_hidden_state is a copy
            assert_close_relative(state.grad, their_grad, f"{name}.grad")
            compared += 1
    assert compared >= len(our_states) - 1
    assert len(ours.transformer_decoder_hidden_states) == model.config.decoder_layers


def test_hidden_states_of_a_padded_batch_are_on_the_autograd_path(model_config):
    """With padding the stages run per valid region; the returned maps are still the ones the next stage read."""
    model, _, _, _, batch, batch_mask = padded_batch_case(model_config("resnet"))
    outputs = model(batch, pixel_mask=batch_mask, output_hidden_states=True)
    states = _retained_hidden_states(outputs)
    _objective(outputs).backward()
    for name, state in states.items():
        assert state.grad is not None and state.grad.abs().sum() > 0, f"{name} is not on the autograd path"
    # the small image's backbone maps: its crop (64x96 of 128x160) receives gradient, the zero padding around it none
    for index, state in enumerate(outputs.encoder_hidden_states):
        stride = batch.shape[-1] // state.shape[-1]
        crop = state.grad[0, :, : 64 // stride, : 96 // stride]
        assert crop.abs().sum() > 0 and crop.abs().sum() == state.grad[0].abs().sum(), (
            f"encoder_hidden_states[{index}]"
        )

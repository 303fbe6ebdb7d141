"""Segmenter: the encoder is transformers' ViTModel, the position resize and sliding window are the original's,
padding does not leak, save/load and the Auto classes round-trip, the loss is the per-pixel cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForSemanticSegmentation, ViTConfig, ViTModel

from mask2former import SegmenterConfig, SegmenterForSemanticSegmentation, SegmenterModel
from mask2former.modeling.decoder_mask_transformer import drop_path
from mask2former.modeling.modeling_segmenter import resize_position_embeddings, window_anchors


def tiny_config(**overrides) -> SegmenterConfig:
    encoder = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "image_size": 32,
        "patch_size": 8,
        "layer_norm_eps": 1e-5,
    }
    encoder.update(overrides.pop("encoder", {}))
    settings = {"encoder_config": encoder, "num_labels": 4, "decoder_dropout": 0.0, "encoder_drop_path_rate": 0.0}
    settings.update(overrides)
    return SegmenterConfig(**settings)


def tiny_model(**overrides) -> SegmenterForSemanticSegmentation:
    torch.manual_seed(0)
    model = SegmenterForSemanticSegmentation(tiny_config(**overrides)).eval()
    with torch.no_grad():  # away from the LayerNorm 1/0 and zero-bias initialisation, so that every weight matters
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def test_encoder_equals_transformers_vit_on_the_same_weights():
    model = tiny_model()
    reference = ViTModel(model.config.encoder_config, add_pooling_layer=False).eval()
    missing, unexpected = reference.load_state_dict(model.segmenter.encoder.state_dict(), strict=True)
    assert not missing and not unexpected
    pixel_values = torch.randn(2, 3, 32, 32)  # the pretraining grid: no resize on either side
    with torch.no_grad():
        ours = model.segmenter(pixel_values).last_hidden_state
        theirs = reference(pixel_values).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_bicubic_mode_resizes_like_transformers_vit():
    # transformers' interpolate_pos_encoding is bicubic (align_corners=False) on square grids: our bicubic mode
    # is the same operation, for any grid.
    model = tiny_model(position_embedding_interpolation="bicubic")
    reference = ViTModel(model.config.encoder_config, add_pooling_layer=False).eval()
    reference.load_state_dict(model.segmenter.encoder.state_dict())
    pixel_values = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        ours = model.segmenter(pixel_values).last_hidden_state
        theirs = reference(pixel_values, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_position_resize_keeps_the_class_token_and_resizes_the_grid_bilinearly():
    embeddings = torch.randn(1, 1 + 2 * 3, 5)
    resized = resize_position_embeddings(embeddings, (2, 3), (4, 5))
    assert resized.shape == (1, 1 + 4 * 5, 5)
    torch.testing.assert_close(resized[:, 0], embeddings[:, 0], rtol=0, atol=0)
    # the grid as an image, resized with torch's own bilinear interpolation
    image = embeddings[0, 1:].T.reshape(5, 2, 3)
    expected = F.interpolate(image[None], size=(4, 5), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(resized[0, 1:], expected.reshape(5, 20).T, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="7 tokens"):
        resize_position_embeddings(embeddings, (3, 3), (4, 4))


def test_logits_at_patch_resolution_for_any_input_size():
    model = tiny_model()
    with torch.no_grad():
        output = model(torch.randn(2, 3, 37, 50))
    # zero-padded to 40 x 56 like the original: ceil(37 / 8) x ceil(50 / 8)
    assert output.logits.shape == (2, 4, 5, 7)
    with torch.no_grad():
        padded = model(F.pad(torch.randn(2, 3, 37, 50), (0, 6, 0, 3)))
    assert padded.logits.shape == (2, 4, 5, 7)


def test_padding_does_not_leak_into_an_image_batched_with_a_larger_one():
    model = tiny_model()
    small, large = torch.randn(3, 24, 40), torch.randn(3, 48, 56)
    batch = torch.zeros(2, 3, 48, 56)
    batch[0, :, :24, :40], batch[1] = small, large
    pixel_mask = torch.zeros(2, 48, 56, dtype=torch.long)
    pixel_mask[0, :24, :40], pixel_mask[1] = 1, 1
    with torch.no_grad():
        alone_small = model(small[None]).logits
        alone_large = model(large[None]).logits
        batched = model(batch, pixel_mask=pixel_mask).logits
        encoded = model.segmenter(batch, pixel_mask=pixel_mask).last_hidden_state
        small_tokens = model.segmenter(small[None]).last_hidden_state
    torch.testing.assert_close(batched[0, :, :3, :5], alone_small[0], rtol=1e-5, atol=1e-5)
    assert batched[0, :, 3:].abs().max() == 0 and batched[0, :, :, 5:].abs().max() == 0
    torch.testing.assert_close(batched[1], alone_large[0], rtol=1e-5, atol=1e-5)
    # the encoder's tokens: class token, then the 6 x 7 grid, the small image's 3 x 5 block top-left
    grid = encoded[0, 1:].reshape(6, 7, -1)
    torch.testing.assert_close(encoded[0, 0], small_tokens[0, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grid[:3, :5].reshape(15, -1), small_tokens[0, 1:], rtol=1e-5, atol=1e-5)


def test_window_anchors_follow_the_original_rule():
    # segm/model/utils.py sliding_window, by hand: starts every stride while start < length - window, then
    # length - window. 40 with window 24, stride 16: range(0, 40, 16) = 0, 16, 32 -> keep 0 -> + 16.
    assert window_anchors(40, 24, 16) == [0, 16]
    # 56: 0, 16, 32, 48 -> keep 0, 16 -> + 32
    assert window_anchors(56, 24, 16) == [0, 16, 32]
    assert window_anchors(24, 24, 24) == [0]


def test_sliding_window_equals_one_forward_when_the_window_covers_the_image():
    model = tiny_model()
    pixel_values = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        single = F.interpolate(model(pixel_values).logits, size=(40, 56), mode="bilinear", align_corners=False)
        covering = model.sliding_window_inference(pixel_values, window_size=64).logits
    torch.testing.assert_close(covering, single, rtol=1e-5, atol=1e-6)


def test_sliding_window_averages_overlapping_windows():
    model = tiny_model()
    pixel_values = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        result = model.sliding_window_inference(pixel_values, window_size=24, window_stride=16, batch_size=2).logits
        # independent reference: every window of the original's grid, upsampled to the window, summed, counted
        total = torch.zeros(4, 40, 56)
        count = torch.zeros(40, 56)
        for top in (0, 16):
            for left in (0, 16, 32):
                window = pixel_values[:, :, top : top + 24, left : left + 24]
                logits = model(window).logits  # (1, K, 3, 3)
                total[:, top : top + 24, left : left + 24] += F.interpolate(
                    logits, size=(24, 24), mode="bilinear", align_corners=False
                )[0]
                count[top : top + 24, left : left + 24] += 1
    assert count.min() >= 1 and count.max() == 4  # windows overlap
    torch.testing.assert_close(result[0], total / count, rtol=1e-5, atol=1e-6)


def test_sliding_window_defaults_to_the_training_crop_and_honours_pixel_mask():
    model = tiny_model()
    assert model.config.sliding_window == (32, 32)  # encoder image_size, stride = window
    small = torch.randn(3, 40, 48)
    batch = torch.zeros(2, 3, 64, 72)
    batch[0, :, :40, :48] = small
    batch[1] = torch.randn(3, 64, 72)
    pixel_mask = torch.zeros(2, 64, 72, dtype=torch.long)
    pixel_mask[0, :40, :48], pixel_mask[1] = 1, 1
    with torch.no_grad():
        batched = model.sliding_window_inference(batch, pixel_mask=pixel_mask).logits
        alone = model.sliding_window_inference(small[None]).logits
    assert batched.shape == (2, 4, 64, 72)
    torch.testing.assert_close(batched[0, :, :40, :48], alone[0], rtol=1e-5, atol=1e-5)
    assert batched[0, :, 40:].abs().max() == 0


def test_loss_is_the_per_pixel_cross_entropy_of_the_upsampled_logits():
    model = tiny_model()
    pixel_values = torch.randn(2, 3, 36, 44)
    labels = torch.randint(0, 4, (2, 36, 44))
    labels[0, :10] = 255
    output = model(pixel_values, labels=labels)
    # the original: bilinear to the padded size (40 x 48), cropped to the image, cross-entropy ignoring 255
    upsampled = F.interpolate(output.logits, size=(40, 48), mode="bilinear", align_corners=False)[:, :, :36, :44]
    expected = F.cross_entropy(upsampled, labels, ignore_index=255)
    torch.testing.assert_close(output.loss, expected)
    output.loss.backward()
    assert model.decoder.cls_emb.grad is not None and model.segmenter.encoder.embeddings.cls_token.grad is not None
    with pytest.raises(ValueError, match="labels must be"):
        model(pixel_values, labels=labels[:, :30])


def test_linear_decoder():
    model = tiny_model(decoder_type="linear")
    assert set(dict(model.decoder.named_parameters())) == {"head.weight", "head.bias"}
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 32, 40)).logits
        tokens = model.segmenter(torch.randn(1, 3, 32, 40)).last_hidden_state
    assert logits.shape == (1, 4, 4, 5) and tokens.shape == (1, 1 + 20, 64)


def test_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    values = torch.ones(4000, 3, 2)
    dropped = drop_path(values, 0.25, training=True)
    per_sample = dropped.flatten(1)
    assert (per_sample == per_sample[:, :1]).all()  # one decision per sample
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.03
    assert abs(dropped.mean().item() - 1.0) < 0.05  # kept samples rescaled by 1 / (1 - p)
    assert drop_path(values, 0.25, training=False) is values
    model = SegmenterForSemanticSegmentation(tiny_config(encoder_drop_path_rate=0.5, decoder_drop_path_rate=0.3))
    rates = [layer.dropout.drop_prob for layer in model.segmenter.encoder.layers]
    assert rates == [0.0, 0.5] and [block.drop_prob for block in model.decoder.blocks] == [0.0, 0.3]


def test_save_load_round_trip_and_auto_classes(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    reloaded, info = SegmenterForSemanticSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    pixel_values = torch.randn(1, 3, 40, 24)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=0)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SegmenterConfig)
    assert type(AutoModelForSemanticSegmentation.from_pretrained(tmp_path)) is SegmenterForSemanticSegmentation
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is SegmenterModel
    with torch.no_grad():
        torch.testing.assert_close(
            base.eval()(pixel_values).last_hidden_state, model.segmenter(pixel_values).last_hidden_state
        )


def test_vit_weights_initialise_the_encoder(tmp_path):
    # a transformers ViT checkpoint (google/vit-* layout) loads into the encoder as it is
    vit = ViTModel(ViTConfig(**tiny_config().encoder_config.to_dict()), add_pooling_layer=False)
    vit.save_pretrained(tmp_path)
    model = SegmenterForSemanticSegmentation(tiny_config())
    model.segmenter.encoder.load_state_dict(ViTModel.from_pretrained(tmp_path, add_pooling_layer=False).state_dict())
    torch.testing.assert_close(
        model.segmenter.encoder.embeddings.position_embeddings, vit.embeddings.position_embeddings
    )


def test_config_defaults_follow_the_original_and_bad_values_are_named():
    config = SegmenterConfig(num_labels=150)
    assert config.encoder_config.layer_norm_eps == 1e-5 and config.position_embedding_interpolation == "bilinear"
    assert (config.decoder_hidden_size, config.decoder_num_attention_heads) == (768, 12)
    assert config.decoder_intermediate_size == 3072 and config.decoder_dropout == 0.1
    # a partial encoder dict keeps the original's defaults, not ViTConfig's (eps 1e-12, 224)
    partial = SegmenterConfig(encoder_config={"hidden_size": 192, "num_attention_heads": 3})
    assert partial.encoder_config.layer_norm_eps == 1e-5 and partial.encoder_config.image_size == 512
    assert partial.decoder_num_attention_heads == 3
    with pytest.raises(Exception, match="decoder_type='conv'"):
        SegmenterConfig(decoder_type="conv")
    with pytest.raises(Exception, match="position_embedding_interpolation"):
        SegmenterConfig(position_embedding_interpolation="nearest")
    with pytest.raises(Exception, match="not divisible"):
        SegmenterConfig(decoder_hidden_size=96, decoder_num_attention_heads=5)


def test_bad_inputs_are_named():
    model = tiny_model()
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="pixel_mask must have shape"):
        model(torch.randn(1, 3, 32, 32), pixel_mask=torch.ones(1, 16, 16))

"""Each modeling stage on its own: position embedding, pixel decoder (with its deformable attention), heads and the
transformer decoder. Shapes, masks and the behaviour each stage promises, independently of end-to-end parity."""

import math

import pytest
import torch
import torch.nn.functional as F

from mask2former import Mask2FormerModel
from mask2former.modeling.heads import Mask2FormerMLPPredictionHead
from mask2former.modeling.padding import ValidRegions
from mask2former.modeling.pixel_decoder import Mask2FormerPixelDecoderEncoder
from mask2former.modeling.position_embedding import Mask2FormerSinePositionEmbedding


@pytest.fixture(scope="module")
def model(tiny_config):
    # decoder_layers=5: four masked-attention layers, so the round robin visits level 0 twice
    torch.manual_seed(0)
    return Mask2FormerModel(tiny_config("swin", decoder_layers=5, num_queries=6)).eval()


def _regions(sizes: list[tuple[int, int]], input_size: tuple[int, int]) -> ValidRegions:
    return ValidRegions(torch.tensor(sizes), input_size)


# ---- position embedding ------------------------------------------------------------------------------------------


def _sine_formula(height: int, width: int, num_features: int, temperature: float, normalize: bool) -> torch.Tensor:
    """The DETR sine embedding written out per channel: `(2F, H, W)`, y half first; channel 2k is sin and 2k+1 is cos
    of the 1-based index divided by temperature ** (2k / F); normalised indices end at 2 pi."""
    embedding = torch.zeros(2 * num_features, height, width, dtype=torch.float64)
    for half, (length, axis) in enumerate([(height, 0), (width, 1)]):
        for channel in range(num_features):
            wavelength = temperature ** (2 * (channel // 2) / num_features)
            for index in range(length):
                position = index + 1.0
                if normalize:
                    position = position / (length + 1e-6) * 2 * math.pi
                value = math.sin(position / wavelength) if channel % 2 == 0 else math.cos(position / wavelength)
                if axis == 0:
                    embedding[half * num_features + channel, index, :] = value
                else:
                    embedding[half * num_features + channel, :, index] = value
    return embedding


@pytest.mark.parametrize("normalize", [False, True])
def test_sine_embedding_equals_the_formula(normalize):
    embedder = Mask2FormerSinePositionEmbedding(num_features=8, temperature=100.0, normalize=normalize)
    embedding = embedder(2, 5, 7, torch.device("cpu"), torch.float64)
    assert embedding.shape == (2, 16, 5, 7)
    expected = _sine_formula(5, 7, 8, 100.0, normalize)
    torch.testing.assert_close(embedding[0], expected)
    torch.testing.assert_close(embedding[1], expected)


def test_sine_embedding_of_a_padded_image_equals_the_image_alone():
    """Normalised over the valid extent: padding does not stretch the embedding of the real cells."""
    embedder = Mask2FormerSinePositionEmbedding(num_features=8, normalize=True)
    alone = embedder(1, 3, 5, torch.device("cpu"), torch.float64)
    mask = torch.zeros(1, 6, 9, dtype=torch.bool)
    mask[:, :3, :5] = True
    padded = embedder(1, 6, 9, torch.device("cpu"), torch.float64, mask)
    torch.testing.assert_close(padded[..., :3, :5], alone)
    # and an all-valid mask is the unmasked embedding
    full = torch.ones(1, 3, 5, dtype=torch.bool)
    torch.testing.assert_close(embedder(1, 3, 5, torch.device("cpu"), torch.float64, full), alone)


def test_sine_embedding_scale_needs_normalize():
    with pytest.raises(ValueError, match="normalize=True"):
        Mask2FormerSinePositionEmbedding(scale=1.0)


# ---- pixel decoder -----------------------------------------------------------------------------------------------


def _features(model, batch_size: int, height: int, width: int) -> list[torch.Tensor]:
    channels = model.pixel_level_module.encoder.channels
    return [torch.randn(batch_size, c, height // s, width // s) for c, s in zip(channels, (4, 8, 16, 32))]


def test_pixel_decoder_shapes_and_no_masks_without_padding(model):
    config = model.config
    decoder = model.pixel_level_module.decoder
    with torch.no_grad():
        out = decoder(_features(model, 2, 64, 96))
    assert [tuple(x.shape) for x in out.multi_scale_features] == [(2, 32, 2, 3), (2, 32, 4, 6), (2, 32, 8, 12)]
    assert out.mask_features.shape == (2, config.mask_feature_size, 16, 24)
    assert out.level_valid_masks is None


def test_pixel_decoder_returns_its_per_level_valid_masks(model):
    decoder = model.pixel_level_module.decoder
    # image 0: 50x70 valid of 64x96; image 1: all valid
    regions = _regions([(50, 70), (64, 96)], (64, 96))
    with torch.no_grad():
        out = decoder(_features(model, 2, 64, 96), regions)
    for stride, mask in zip((32, 16, 8), out.level_valid_masks):
        expected = torch.zeros(2, 64 // stride, 96 // stride, dtype=torch.bool)
        expected[0, : math.ceil(50 / stride), : math.ceil(70 / stride)] = True
        expected[1] = True
        assert torch.equal(mask, expected), stride


def test_pixel_decoder_with_all_valid_regions_is_the_unpadded_path(model):
    """The masked path with nothing masked gives exactly the unmasked result (the per-region engine and torch.export
    rely on it)."""
    decoder = model.pixel_level_module.decoder
    features = _features(model, 2, 64, 64)
    with torch.no_grad():
        unpadded = decoder(features)
        masked = decoder(features, _regions([(64, 64), (64, 64)], (64, 64)))
    for plain, with_masks in zip(unpadded.multi_scale_features, masked.multi_scale_features):
        torch.testing.assert_close(with_masks, plain, rtol=0, atol=0)
    torch.testing.assert_close(masked.mask_features, unpadded.mask_features, rtol=0, atol=0)


def test_deformable_attention_never_reads_padded_values(model):
    attention = model.pixel_level_module.decoder.encoder.layers[0].self_attn
    shapes = [(2, 3), (4, 6), (8, 12)]
    length = sum(h * w for h, w in shapes)
    hidden = torch.randn(2, length, 32)
    positions = torch.randn(2, length, 32)
    reference = torch.rand(2, length, 3, 2)
    valid = torch.rand(2, length) > 0.3
    changed = torch.where(valid[..., None], hidden, torch.randn_like(hidden) * 100)
    with torch.no_grad():
        first, _ = attention(hidden, positions, reference, shapes, valid)
        # values differ only at masked positions (the queries there too, so only the valid queries are compared)
        second, _ = attention(changed, positions, reference, shapes, valid)
        unmasked, _ = attention(changed, positions, reference, shapes, None)
    torch.testing.assert_close(second[valid], first[valid], rtol=1e-5, atol=1e-5)
    assert (unmasked[valid] - first[valid]).abs().max() > 1e-2  # the probe: without the mask they leak


def test_encoder_reference_points_follow_the_valid_ratios():
    shapes = [(2, 4), (4, 8)]
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.5], [0.75, 0.5]]])  # (B, L, 2) as (width, height)
    points = Mask2FormerPixelDecoderEncoder.reference_points(shapes, ratios)  # (B, S, L, 2)
    assert points.shape == (2, 8 + 32, 2, 2)
    for batch in range(2):
        start = 0
        for level, (height, width) in enumerate(shapes):
            for row in range(height):
                for col in range(width):
                    index = start + row * width + col
                    # normalised by the own level's valid extent, rescaled to each level's padded extent
                    x = (col + 0.5) / (ratios[batch, level, 0] * width)
                    y = (row + 0.5) / (ratios[batch, level, 1] * height)
                    expected = torch.stack([x * ratios[batch, :, 0], y * ratios[batch, :, 1]], -1)
                    torch.testing.assert_close(points[batch, index], expected)
            start += height * width


# ---- heads -------------------------------------------------------------------------------------------------------


def test_mlp_head_has_relu_between_layers_only():
    head = Mask2FormerMLPPredictionHead(4, 8, 3, num_layers=3)
    assert [block[0].in_features for block in head] == [4, 8, 8]
    assert [block[0].out_features for block in head] == [8, 8, 3]
    assert [type(block[1]).__name__ for block in head] == ["ReLU", "ReLU", "Identity"]
    x = torch.randn(5, 4)
    expected = head[2][0](F.relu(head[1][0](F.relu(head[0][0](x)))))
    torch.testing.assert_close(head(x), expected)


def _predictor_inputs(model):
    """The model's mask predictor, queries `(B=2, Q=6, C)` and mask features `(2, D, 8, 12)`."""
    return model.transformer_module.decoder.mask_predictor, torch.randn(2, 6, 32), torch.randn(2, 32, 8, 12)


def test_mask_predictor_logits_are_embedding_dot_mask_features(model):
    predictor, queries, mask_features = _predictor_inputs(model)
    with torch.no_grad():
        logits, attention_mask = predictor(queries, mask_features, (2, 3))
        embeddings = predictor.mask_embedder(queries)  # (B, Q, D)
    assert logits.shape == (2, 6, 8, 12) and attention_mask.shape == (2, 1, 6, 6)
    expected = (embeddings[:, :, :, None, None] * mask_features[:, None]).sum(2)  # (B, Q, D, H, W) -> (B, Q, H, W)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_attention_mask_thresholds_the_resized_mask_at_one_half(model):
    predictor, queries, mask_features = _predictor_inputs(model)
    with torch.no_grad():
        logits, attention_mask = predictor(queries, mask_features, (4, 6))
    resized = F.interpolate(logits, size=(4, 6), mode="bilinear", align_corners=False).flatten(2)  # (B, Q, 24)
    expected = resized.sigmoid() >= 0.5
    expected[~expected.any(-1)] = True  # a query that covers nothing attends everywhere
    assert torch.equal(attention_mask[:, 0], expected)
    assert expected.any() and not expected.all()  # the probe has both kinds of key


def test_attention_mask_excludes_padded_keys_and_falls_back_to_valid_keys(model):
    predictor, queries, mask_features = _predictor_inputs(model)
    key_valid = torch.ones(2, 24, dtype=torch.bool)
    key_valid[0, 12:] = False
    with torch.no_grad():
        logits, attention_mask = predictor(queries, mask_features, (4, 6), key_valid)
        # mask features opposite to the query's own embedding: its logits are -|e|^2 < 0 at every pixel
        single_query = queries[:, :1]
        opposite = -predictor.mask_embedder(single_query)[:, 0, :, None, None].expand(-1, -1, 8, 12)
        logits_empty, mask_empty = predictor(single_query, opposite, (4, 6), key_valid)
    assert not attention_mask[0, 0][:, 12:].any()
    resized = F.interpolate(logits, size=(4, 6), mode="bilinear", align_corners=False).flatten(2)
    inside = (resized.sigmoid() >= 0.5) & key_valid[:, None]
    covered = inside.any(-1)
    assert torch.equal(attention_mask[:, 0][covered], inside[covered])
    # a query that covers nothing falls back to the valid keys only
    assert (logits_empty < 0).all()
    assert torch.equal(mask_empty[:, 0], key_valid[:, None])


# ---- transformer decoder -----------------------------------------------------------------------------------------


def _decoder_inputs(model, batch_size: int = 2):
    multi_scale = [torch.randn(batch_size, 32, h, w) for h, w in [(2, 3), (4, 6), (8, 12)]]
    return multi_scale, torch.randn(batch_size, 32, 16, 24)


def test_transformer_decoder_shapes_and_layouts(model):
    config = model.config
    multi_scale, mask_features = _decoder_inputs(model)
    with torch.no_grad():
        out = model.transformer_module(multi_scale, mask_features, output_hidden_states=True, output_attentions=True)
    num_layers = config.decoder_layers - 1
    assert len(out.masks_queries_logits) == num_layers + 1
    assert all(tuple(masks.shape) == (2, 6, 16, 24) for masks in out.masks_queries_logits)
    # per-layer states in transformers' (Q, B, C) layout; the last state batch-first
    assert len(out.intermediate_hidden_states) == len(out.hidden_states) == num_layers + 1
    assert all(tuple(state.shape) == (6, 2, 32) for state in out.intermediate_hidden_states + out.hidden_states)
    assert out.last_hidden_state.shape == (2, 6, 32)
    torch.testing.assert_close(out.hidden_states[-1].transpose(0, 1), out.last_hidden_state)
    # the intermediate states are the layer-normed hidden states
    layernorm = model.transformer_module.decoder.layernorm
    torch.testing.assert_close(out.intermediate_hidden_states[-1], layernorm(out.hidden_states[-1]))
    assert [tuple(weights.shape) for weights in out.attentions] == [(2, 2, 6, 6)] * num_layers


def test_decoder_layers_attend_round_robin_inside_the_previous_prediction(model):
    """Layer i reads level i % 3 (strides 32, 16, 8, 32, ...) under the mask the previous prediction gives."""
    multi_scale, mask_features = _decoder_inputs(model)
    seen = []
    hooks = [
        layer.cross_attn.register_forward_pre_hook(lambda module, args: seen.append((args[1].shape[1], args[3])))
        for layer in model.transformer_module.decoder.layers
    ]
    try:
        with torch.no_grad():
            out = model.transformer_module(multi_scale, mask_features)
    finally:
        for hook in hooks:
            hook.remove()
    sizes = [(2, 3), (4, 6), (8, 12)]
    predictor = model.transformer_module.decoder.mask_predictor
    assert len(seen) == 4
    for index, (num_keys, attention_mask) in enumerate(seen):
        height, width = sizes[index % 3]
        assert num_keys == height * width
        with torch.no_grad():
            _, expected = predictor(
                out.intermediate_hidden_states[index].transpose(0, 1), mask_features, (height, width)
            )
        assert torch.equal(attention_mask, expected), index


def test_transformer_decoder_excludes_padded_keys(model):
    """Features at padded cells never reach the queries: changing them leaves every prediction as it is."""
    multi_scale, mask_features = _decoder_inputs(model)
    regions = _regions([(40, 60), (64, 96)], (64, 96))
    level_masks = tuple(regions.on_grid(*x.shape[-2:]) for x in multi_scale)
    changed = [torch.where(mask[:, None], x, torch.randn_like(x) * 50) for x, mask in zip(multi_scale, level_masks)]
    with torch.no_grad():
        first = model.transformer_module(multi_scale, mask_features, level_masks)
        second = model.transformer_module(changed, mask_features, level_masks)
        leaked = model.transformer_module(changed, mask_features)
    for mine, theirs in zip(first.masks_queries_logits, second.masks_queries_logits):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first.last_hidden_state, second.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert (leaked.last_hidden_state[0] - first.last_hidden_state[0]).abs().max() > 1e-3  # the probe


def test_returned_query_states_are_on_the_autograd_path(model):
    multi_scale, mask_features = _decoder_inputs(model)
    out = model.transformer_module(multi_scale, mask_features, output_hidden_states=True)
    states = out.hidden_states + out.intermediate_hidden_states
    for state in states:
        state.retain_grad()
    sum(masks.square().sum() for masks in out.masks_queries_logits).backward()
    # transformers' layout, and yet the very tensors the predictions were computed from
    for name in ("hidden_states", "intermediate_hidden_states"):
        for index, state in enumerate(getattr(out, name)):
            assert state.grad is not None and state.grad.abs().sum() > 0, f"{name}[{index}]"

"""The whole objective in the model: a tiny model overfits one batch on the CPU; its loss equals transformers'."""

import torch

from mask2former import Mask2FormerForUniversalSegmentation

# The query-only prediction plus one masked-attention layer: deep supervision on both.
OVERFIT = dict(decoder_layers=2, num_queries=6, num_labels=3, train_num_points=256)


def test_tiny_model_overfits_one_batch(tiny_config):
    # On a CPU shared with other work, one intra-op thread avoids oversubscription (10x faster here).
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = Mask2FormerForUniversalSegmentation(tiny_config("resnet", **OVERFIT)).train()
        pixel_values = torch.randn(2, 3, 64, 64)
        masks = torch.zeros(2, 2, 64, 64)
        # Rectangles on the 4-pixel grid of the 1/4-resolution predictions, so near-perfect masks are reachable.
        masks[0, 0, 8:40, 8:32] = 1
        masks[0, 1, 32:60, 36:60] = 1
        masks[1, 0, 4:28, 12:60] = 1
        masks[1, 1, 36:60, 4:40] = 1
        mask_labels = [masks[0], masks[1]]
        # The same classes in both images: the first (query-only) prediction cannot depend on the image, and its
        # auxiliary classification term could not go to zero otherwise.
        class_labels = [torch.tensor([0, 2]), torch.tensor([2, 0])]
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
        losses = []
        for _ in range(100):
            outputs = model(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels)
            optimizer.zero_grad()
            outputs.loss.backward()
            optimizer.step()
            losses.append(outputs.loss.item())
        assert set(outputs.loss_dict) == {
            f"loss_{name}{suffix}" for name in ("cross_entropy", "mask", "dice") for suffix in ("", "_0")
        }
        # Point sampling makes each step's loss a random estimate: compare the mean of the last 5 steps.
        final = sum(losses[-5:]) / 5
        assert final <= 0.1 * losses[0], (losses[0], final)
    finally:
        torch.set_num_threads(previous_threads)


def test_model_loss_matches_transformers_model_with_the_same_weights_and_seed(tiny_config):
    # The loss wired into the model: our Mask2FormerForUniversalSegmentation and transformers' with the same weights
    # and the same seed (hence the same sampled points) give the same total; the per-term dict holds the weighted
    # terms of every decoder layer.
    from transformers import Mask2FormerForUniversalSegmentation as TransformersMask2FormerForUniversalSegmentation

    config = tiny_config("resnet", **OVERFIT)
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    reference = TransformersMask2FormerForUniversalSegmentation(config).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    pixel_values = torch.randn(2, 3, 64, 64)
    mask_labels = [(torch.rand(2, 64, 64) > 0.5).float(), (torch.rand(3, 64, 64) > 0.5).float()]
    class_labels = [torch.tensor([0, 2]), torch.tensor([1, 0, 1])]
    with torch.no_grad():
        torch.manual_seed(5)
        ours = model(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels)
        torch.manual_seed(5)
        theirs = reference(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-4, atol=1e-5)
    assert set(ours.loss_dict) == {
        f"loss_{name}{suffix}" for name in ("cross_entropy", "mask", "dice") for suffix in ("", "_0")
    }
    torch.testing.assert_close(sum(ours.loss_dict.values()), ours.loss)

"""Train a tiny video Mask2Former from scratch on ``synthetic-moving-shapes`` and print its held-out video AP.

    python bench/video_synthetic.py --steps 1500 [--threads 2] [--output-dir /tmp/video-demo]

The model is the image demo's size class (Swin with one block per stage, 64-wide pixel decoder and transformer
decoder, 3 masked-attention layers, 16 queries); training clips are 2 frames within 3 of each other, flipped alike;
AdamW 8e-4, weight decay 0.05, 50 warm-up steps then poly 0.9, gradient clip 0.01, batch 4 clips. Evaluation runs
each held-out 6-frame video as one clip (the original's inference: top-10 (query, class) pairs, masks at logit 0)
and scores the results with ``training.video_metrics`` (video AP).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import SwinConfig

from mask2former import VideoMask2FormerConfig, VideoMask2FormerForVideoSegmentation
from mask2former.processing.video_processing_mask2former import VideoMask2FormerVideoProcessor
from mask2former.training.data.video_transforms import ClipFlip
from mask2former.training.data.youtube_vis import VideoClipDataset, load_video_dataset
from mask2former.training.video_collate import VideoClipCollator
from mask2former.training.video_metrics import evaluate_video_results

DATA_OPTIONS = {"num_train_videos": 800, "num_val_videos": 32, "num_frames": 6, "image_size": 96}


def demo_config(num_labels: int) -> VideoMask2FormerConfig:
    backbone = SwinConfig(
        image_size=96, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], window_size=3, drop_path_rate=0.0,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    return VideoMask2FormerConfig(
        backbone_config=backbone, feature_size=64, mask_feature_size=64, hidden_dim=64, encoder_feedforward_dim=128,
        encoder_layers=2, decoder_layers=4, num_attention_heads=4, dim_feedforward=128, num_queries=16,
        train_num_points=2048, num_labels=num_labels,
    )  # fmt: skip


@torch.no_grad()
def evaluate(model, processor, data, limit: int | None = None) -> dict[str, float]:
    model.eval()
    clips = VideoClipDataset(data, num_frames=None, training=False)
    results = []
    for index in range(len(clips) if limit is None else min(limit, len(clips))):
        clip = clips[index]
        inputs = processor([clip["frames"]], return_tensors="pt")
        outputs = model(pixel_values_videos=inputs["pixel_values_videos"], pixel_mask=inputs["pixel_mask"])
        height, width = clip["frames"][0].shape[:2]
        [result] = processor.post_process_video_instance_segmentation(
            outputs, target_sizes=[(height, width)], top_k=10, return_coco_annotation=True
        )
        for score, label, segmentations in zip(result["scores"], result["labels"], result["segmentations"]):
            results.append(
                {
                    "video_id": clip["video_id"],
                    "category_id": data.label_info.category_ids[int(label)],
                    "score": float(score),
                    "segmentations": segmentations,
                }
            )
    model.train()
    return evaluate_video_results(data.annotation_file, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--output-dir", type=Path, default=None, help="save the final model here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train = load_video_dataset("synthetic-moving-shapes", "train", seed=args.seed, **DATA_OPTIONS)
    held_out = load_video_dataset("synthetic-moving-shapes", "valid", seed=args.seed, **DATA_OPTIONS)
    processor = VideoMask2FormerVideoProcessor(do_resize=False, size_divisor=32)
    model = VideoMask2FormerForVideoSegmentation(demo_config(train.label_info.num_labels)).train()
    model.config.id2label = dict(train.label_info.id2label)
    clips = VideoClipDataset(
        train, num_frames=2, frame_range=3, training=True, transform=ClipFlip(0.5), seed=args.seed
    )
    loader = torch.utils.data.DataLoader(
        clips, batch_size=4, shuffle=True, collate_fn=VideoClipCollator(processor), drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=8e-4, weight_decay=0.05)
    warmup = 50

    def lr_factor(step: int) -> float:
        if step < warmup:
            return 0.01 + (1 - 0.01) * step / warmup
        return (1 - (step - warmup) / max(1, args.steps - warmup)) ** 0.9

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    step, epoch, start = 0, 0, time.perf_counter()
    history = []
    while step < args.steps:
        clips.set_epoch(epoch)
        for batch in loader:
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % 50 == 0:
                print(f"step {step} loss {loss.item():.3f} {time.perf_counter() - start:.0f}s", flush=True)
            if step % args.eval_every == 0 or step == args.steps:
                metrics = evaluate(model, processor, held_out)
                history.append({"step": step, "seconds": round(time.perf_counter() - start), **metrics})
                print(json.dumps(history[-1]), flush=True)
            if step >= args.steps:
                break
        epoch += 1
    if args.output_dir is not None:
        model.save_pretrained(args.output_dir)
        processor.save_pretrained(args.output_dir)
    print(json.dumps({"final": history[-1], "loss_is_finite": math.isfinite(loss.item())}))


if __name__ == "__main__":
    main()

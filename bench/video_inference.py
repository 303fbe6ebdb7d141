"""Clip inference time and peak memory of video Mask2Former (Swin-T, 384 x 384 frames) for clips of T frames.

    python bench/video_inference.py [--frames 2 5 10] [--size 384] [--threads 2]

Each T runs in its own process (so the peak resident memory is that clip's): the architecture of
``hub_configs/video-mask2former-swin-tiny-ytvis2019`` with random weights, one warm-up call, then the median of
``--repeats`` timed calls under ``torch.no_grad()``. Prints one JSON line per T with seconds per clip, seconds per
frame and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "hub_configs" / "video-mask2former-swin-tiny-ytvis2019"


def measure(num_frames: int, size: int, repeats: int, threads: int) -> dict:
    import torch

    from mask2former import VideoMask2FormerConfig, VideoMask2FormerForVideoSegmentation

    torch.set_num_threads(threads)
    model = VideoMask2FormerForVideoSegmentation(VideoMask2FormerConfig.from_pretrained(CONFIG)).eval()
    clip = torch.randn(1, num_frames, 3, size, size)
    times = []
    with torch.no_grad():
        model(pixel_values_videos=clip)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(pixel_values_videos=clip)
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"frames": num_frames, "size": size, "seconds_per_clip": round(seconds, 2),
            "seconds_per_frame": round(seconds / num_frames, 2), "peak_rss_mib": round(peak_mib)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.size, args.repeats, args.threads)))
        return
    with open("/proc/loadavg") as handle:
        print(json.dumps({"load_average": handle.read().split()[:3]}))
    for num_frames in args.frames:
        command = [sys.executable, __file__, "--one", str(num_frames), "--size", str(args.size),
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]  # fmt: skip
        print(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()

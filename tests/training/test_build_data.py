"""Training data of a run: a bad example is skipped by default (replaced, counted in the log, also from DataLoader
workers), or stops the run with --on-bad-input raise."""

import json

import pytest

from mask2former.training.build_data import MAX_REPLACEMENT_TRIES, AugmentedRecords
from mask2former.training.data import BadExampleError, generate_synthetic_shapes, load_dataset_for_segmentation
from mask2former.training.train import main


def _root_with_bad_images(tmp_path, num_images=8):
    """synthetic-shapes (64 px) with train images 2 (truncated) and 5 (not an image) and val image 0 broken."""
    root = generate_synthetic_shapes(tmp_path / "data", seed=0, num_images=num_images, num_val_images=2, image_size=64)
    train_images = sorted((root / "train2017").glob("*.png"))
    train_images[2].write_bytes(train_images[2].read_bytes()[:100])
    train_images[5].write_bytes(b"not a png")
    sorted((root / "val2017").glob("*.png"))[0].write_bytes(b"")
    return root, [train_images[2], train_images[5]]


def test_a_skipped_example_is_replaced_by_the_next_good_one_carrying_its_reason(tmp_path):
    root, bad = _root_with_bad_images(tmp_path)
    dataset = load_dataset_for_segmentation(root, "train", on_bad_input="skip").dataset
    records = AugmentedRecords(dataset, replace_skipped=True)
    replaced = records[2]
    assert not replaced["skipped"] and replaced["image_id"] == dataset[3]["image_id"]
    assert len(replaced["skip_reasons"]) == 1 and bad[0].name in replaced["skip_reasons"][0]
    assert records[3]["skip_reasons"] == []
    # evaluation keeps the placeholder: the collator leaves it out, nothing is scored twice
    assert AugmentedRecords(dataset)[2]["skipped"]


def test_a_run_of_bad_examples_stops_with_the_first_reason(tmp_path):
    root = generate_synthetic_shapes(tmp_path, seed=0, num_images=MAX_REPLACEMENT_TRIES + 2, num_val_images=1)
    for path in sorted((root / "train2017").glob("*.png")):
        path.write_bytes(b"")
    dataset = load_dataset_for_segmentation(root, "train", on_bad_input="skip").dataset
    with pytest.raises(BadExampleError, match="in a row from index 0 are bad input"):
        AugmentedRecords(dataset, replace_skipped=True)[0]


def test_training_skips_bad_examples_by_default_and_logs_their_count_from_workers(tmp_path, caplog):
    root, bad = _root_with_bad_images(tmp_path)
    output_dir = tmp_path / "run"
    arguments = ["--recipe", "tiny-test", "--dataset", str(root), "--output-dir", str(output_dir), "--no-progress",
                 "--no-tensorboard", "--max-steps", "4", "--log-every", "2", "--num-workers", "2"]  # fmt: skip
    assert main(arguments) == 0
    log = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    # 8 images, batches of 2, 4 steps: one epoch, each bad image drawn once, read in a worker
    assert sum(record["skipped_examples"] for record in log) == 2
    warned = "\n".join(record.getMessage() for record in caplog.records)
    assert all(path.name in warned for path in bad)
    assert json.loads((output_dir / "metrics.json").read_text())["PQ"] >= 0  # evaluated the good val image

    with pytest.raises(BadExampleError, match="|".join(path.name for path in bad)):
        main([*arguments[:5], str(tmp_path / "strict"), *arguments[6:], "--on-bad-input", "raise"])

"""Loading: the COCO sample both ways, a fake ADE20K tree, a local parquet dataset, synthetic-shapes, bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mask2former.training.data import (
    BadExampleError,
    generate_synthetic_shapes,
    id_to_rgb,
    load_dataset_for_segmentation,
    rgb_to_id,
    semantic_label_map,
)


def _panoptic_json(root):
    with open(root / "annotations" / "panoptic_val2017.json") as handle:
        return json.load(handle)


def test_coco_sample_loads_as_panoptic(coco_sample_root):
    loaded = load_dataset_for_segmentation(coco_sample_root, "val2017", "panoptic")
    dataset, info = loaded.dataset, loaded.label_info
    data = _panoptic_json(coco_sample_root)
    # 133 classes, ids 1..200 remapped in increasing order, 80 things
    category_ids = sorted(category["id"] for category in data["categories"])
    assert info.num_labels == 133 and len(info.thing_ids) == 80
    assert [info.category_ids[label] for label in range(133)] == category_ids
    assert info.id2label[0] == "person" and info.label2id["person"] == 0
    assert len(dataset) == 2
    record = dataset[1]
    annotation = data["annotations"][1]
    assert record["image_id"] == str(annotation["image_id"])
    assert record["image"].size == (640, 360) and record["segment_map"].shape == (360, 640)
    # each listed segment has exactly the pixels of its colour in the official PNG, and its remapped label
    png = rgb_to_id(
        np.asarray(Image.open(coco_sample_root / "annotations" / "panoptic_val2017" / annotation["file_name"]))
    )
    assert np.array_equal(record["segment_map"], png)
    for segment, segment_id, label, crowd in zip(
        annotation["segments_info"], record["segment_ids"], record["class_labels"], record["iscrowd"]
    ):
        assert segment_id == segment["id"]
        assert info.category_ids[label] == segment["category_id"]
        assert crowd == bool(segment["iscrowd"])
        assert (record["segment_map"] == segment_id).sum() == segment["area"]


def test_coco_sample_loads_as_instances_with_the_same_masks(coco_sample_root):
    panoptic = load_dataset_for_segmentation(coco_sample_root, "val2017", "panoptic")
    instance = load_dataset_for_segmentation(coco_sample_root, "val2017", "instance")
    assert instance.label_info.thing_ids == panoptic.label_info.thing_ids
    for index in range(2):
        a, b = panoptic.dataset[index], instance.dataset[index]
        assert a["image_id"] == b["image_id"]
        # the RLE masks of the instances JSON are the panoptic segments: same (label, crowd, mask) sets
        masks_a = {
            (lab, c, (a["segment_map"] == s).tobytes())
            for s, lab, c in zip(a["segment_ids"], a["class_labels"], a["iscrowd"])
        }
        masks_b = {
            (lab, c, (b["segment_map"] == s).tobytes())
            for s, lab, c in zip(b["segment_ids"], b["class_labels"], b["iscrowd"])
        }
        assert masks_a == masks_b


def test_semantic_label_map_of_a_record(coco_sample_root):
    record = load_dataset_for_segmentation(coco_sample_root, "val2017", "semantic").dataset[0]
    labels = semantic_label_map(record, ignore_label=255)
    for segment_id, label in zip(record["segment_ids"], record["class_labels"]):
        assert np.all(labels[record["segment_map"] == segment_id] == label)
    assert np.all(labels[record["segment_map"] == 0] == 255)


def _fake_ade20k(root, count=3, size=(24, 32)):
    """ADEChallengeData2016 layout: images/<split>/*.jpg, annotations/<split>/*.png (value = class + 1, 0 = ignore)."""
    rng = np.random.default_rng(0)
    for folder in ("training", "validation"):
        (root / "images" / folder).mkdir(parents=True)
        (root / "annotations" / folder).mkdir(parents=True)
        for index in range(count):
            stem = f"ADE_{folder[:5]}_{index:08d}"
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
                root / "images" / folder / f"{stem}.jpg"
            )
            annotation = np.zeros(size, dtype=np.uint8)
            annotation[:, : size[1] // 2] = 3 + index  # class value 3 + index -> label 2 + index
            annotation[: size[0] // 2, size[1] // 2 :] = 150  # the last class
            Image.fromarray(annotation).save(root / "annotations" / folder / f"{stem}.png")
    return root


def test_ade20k_layout(tmp_path):
    root = _fake_ade20k(tmp_path / "ADEChallengeData2016")
    loaded = load_dataset_for_segmentation(root, "validation", "semantic")
    dataset, info = loaded.dataset, loaded.label_info
    assert info.num_labels == 150 and info.thing_ids == []
    assert (info.id2label[0], info.id2label[2], info.id2label[149]) == ("wall", "sky", "flag")
    record = dataset[1]
    assert record["class_labels"] == [3, 149]
    labels = semantic_label_map(record)
    assert np.all(labels[:, :16] == 3) and np.all(labels[:12, 16:] == 149) and np.all(labels[12:, 16:] == 255)
    with pytest.raises(ValueError, match="task='semantic'"):
        load_dataset_for_segmentation(root, "validation", "panoptic")


def _write_parquet(tmp_path, coco_sample_root):
    """A Hub-style parquet dataset (image, annotation PNG, segments_info) written by `datasets` itself."""
    import datasets

    data = _panoptic_json(coco_sample_root)
    rows = {"picture": [], "panoptic": [], "segments": [], "key": []}
    for image, annotation in zip(data["images"], data["annotations"]):
        rows["picture"].append(str(coco_sample_root / "val2017" / image["file_name"]))
        rows["panoptic"].append(str(coco_sample_root / "annotations" / "panoptic_val2017" / annotation["file_name"]))
        rows["segments"].append(
            [{k: s[k] for k in ("id", "category_id", "iscrowd")} for s in annotation["segments_info"]]
        )
        rows["key"].append(image["id"])
    dataset = (
        datasets.Dataset.from_dict(rows)
        .cast_column("picture", datasets.Image())
        .cast_column("panoptic", datasets.Image())
    )
    folder = tmp_path / "hub_dataset" / "data"
    folder.mkdir(parents=True)
    dataset.to_parquet(str(folder / "validation-00000-of-00001.parquet"))
    return folder.parent, data["categories"]


@pytest.mark.parametrize("streaming", [False, True])
def test_local_parquet_dataset_with_column_mapping(tmp_path, coco_sample_root, streaming):
    folder, categories = _write_parquet(tmp_path, coco_sample_root)
    loaded = load_dataset_for_segmentation(
        str(folder),
        "validation",
        "panoptic",
        streaming=streaming,
        categories=categories,
        column_mapping={"image": "picture", "annotation": "panoptic", "segments_info": "segments", "image_id": "key"},
    )
    reference = load_dataset_for_segmentation(coco_sample_root, "val2017", "panoptic")
    dataset = loaded.dataset
    records = list(dataset) if streaming else [dataset[0], dataset[1]]
    assert len(records) == 2
    assert loaded.label_info.category_ids == reference.label_info.category_ids
    for record, expected in zip(records, [reference.dataset[0], reference.dataset[1]]):
        assert record["image_id"] == expected["image_id"]
        assert np.array_equal(record["segment_map"], expected["segment_map"])
        assert record["class_labels"] == expected["class_labels"] and record["iscrowd"] == expected["iscrowd"]
        assert np.array_equal(np.asarray(record["image"]), np.asarray(expected["image"]))


def test_parquet_missing_column_is_named(tmp_path, coco_sample_root):
    folder, categories = _write_parquet(tmp_path, coco_sample_root)
    with pytest.raises(ValueError, match="column_mapping"):
        load_dataset_for_segmentation(str(folder), "validation", categories=categories)


def test_instance_channels_layout(tmp_path):
    """ade20k-mini layout: channel 0 = class value, channel 1 = instance id."""
    import datasets

    annotation = np.zeros((8, 8, 3), dtype=np.uint8)
    annotation[:4, :4] = (2, 1, 0)  # class 2, instance 1
    annotation[4:, :4] = (2, 2, 0)  # class 2, instance 2
    annotation[:4, 4:] = (1, 1, 0)  # class 1, instance 1 (the same instance number, another class)
    Image.fromarray(annotation).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    dataset = datasets.Dataset.from_dict(
        {
            "image": [str(tmp_path / "i.png")],
            "annotation": [str(tmp_path / "a.png")],
            "semantic_class_to_id": [{"background": 0, "a": 1, "b": 2}],
        }
    )
    dataset = dataset.cast_column("image", datasets.Image()).cast_column("annotation", datasets.Image())
    (tmp_path / "set").mkdir()
    dataset.to_parquet(str(tmp_path / "set" / "train.parquet"))
    # the labels come from the semantic_class_to_id column (background dropped, values 1.. -> labels 0..)
    loaded = load_dataset_for_segmentation(
        str(tmp_path / "set"), "train", "instance", annotation_format="instance_channels"
    )
    assert loaded.label_info.id2label == {0: "a", 1: "b"}
    record = loaded.dataset[0]
    assert len(record["segment_ids"]) == 3 and sorted(record["class_labels"]) == [0, 1, 1]
    label_of = dict(zip(record["segment_ids"], record["class_labels"]))
    assert label_of[record["segment_map"][0, 0]] == 1 and label_of[record["segment_map"][0, 7]] == 0
    assert record["segment_map"][0, 0] != record["segment_map"][7, 0]
    assert record["segment_map"][7, 7] == 0


def test_synthetic_shapes_deterministic_and_read_as_coco(tmp_path):
    first = generate_synthetic_shapes(tmp_path / "a", seed=3, num_images=4, num_val_images=2, image_size=48)
    second = generate_synthetic_shapes(tmp_path / "b", seed=3, num_images=4, num_val_images=2, image_size=48)
    other = generate_synthetic_shapes(tmp_path / "c", seed=4, num_images=4, num_val_images=2, image_size=48)
    files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(second) for path in second.rglob("*") if path.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert any((first / f).read_bytes() != (other / f).read_bytes() for f in files if f.suffix == ".png")

    loaded = load_dataset_for_segmentation(
        "synthetic-shapes", "train", cache_dir=tmp_path / "a", seed=3, num_images=4, num_val_images=2, image_size=48
    )
    dataset, info = loaded.dataset, loaded.label_info
    assert info.id2label == {0: "circle", 1: "square", 2: "triangle", 3: "sky", 4: "ground", 5: "water"}
    assert info.thing_ids == [0, 1, 2] and info.category_ids[3] == 10
    assert len(dataset) == 4
    for record in dataset:
        # every pixel belongs to a listed segment, each listed segment has pixels, stuff and things are present
        assert set(np.unique(record["segment_map"]).tolist()) == set(record["segment_ids"])
        assert any(label in info.thing_ids for label in record["class_labels"])
        assert any(label not in info.thing_ids for label in record["class_labels"])
    assert (
        len(
            load_dataset_for_segmentation(
                "synthetic-shapes",
                "val",
                cache_dir=tmp_path / "a",
                seed=3,
                num_images=4,
                num_val_images=2,
                image_size=48,
            ).dataset
        )
        == 2
    )


def test_dataloader_workers(coco_sample_root):
    dataset = load_dataset_for_segmentation(coco_sample_root, "val2017", "panoptic").dataset
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=lambda batch: batch[0])
    image_ids = sorted(record["image_id"] for record in loader)
    assert image_ids == ["142238", "439180"]
    # a stream is split across the workers: every image exactly once
    stream = load_dataset_for_segmentation(coco_sample_root, "val2017", "panoptic", streaming=True).dataset
    loader = torch.utils.data.DataLoader(stream, batch_size=1, num_workers=2, collate_fn=lambda batch: batch[0])
    assert sorted(record["image_id"] for record in loader) == ["142238", "439180"]


def _copy_sample(coco_sample_root, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(coco_sample_root, root)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def test_bad_input_errors_name_file_and_id(coco_sample_root, tmp_path):
    root = _copy_sample(coco_sample_root, tmp_path)
    data = _panoptic_json(root)
    json_path = root / "annotations" / "panoptic_val2017.json"

    # unknown category id -> error naming the image id; skip mode counts it
    broken = json.loads(json.dumps(data))
    broken["annotations"][0]["segments_info"][0]["category_id"] = 999
    json_path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="142238.*unknown category ids \\[999\\]"):
        load_dataset_for_segmentation(root, "val2017", "panoptic")
    skipping = load_dataset_for_segmentation(root, "val2017", "panoptic", on_bad_input="skip")
    assert len(skipping.dataset) == 1 and "142238" in skipping.skipped[0]

    # segment id in the PNG absent from segments_info
    broken = json.loads(json.dumps(data))
    del broken["annotations"][1]["segments_info"][3]
    json_path.write_text(json.dumps(broken))
    dataset = load_dataset_for_segmentation(root, "val2017", "panoptic").dataset
    with pytest.raises(ValueError, match="000000439180.png.*439180.*segments_info does not list"):
        dataset[1]

    # annotation PNG of another size than its image
    json_path.write_text(json.dumps(data))
    png = root / "annotations" / "panoptic_val2017" / "000000142238.png"
    Image.open(png).crop((0, 0, 100, 100)).save(png)
    with pytest.raises(ValueError, match="000000142238.png.*142238.*100x100"):
        load_dataset_for_segmentation(root, "val2017", "panoptic").dataset[0]

    # missing image
    (root / "val2017" / "000000439180.jpg").unlink()
    with pytest.raises(ValueError, match="000000439180.jpg.*439180"):
        load_dataset_for_segmentation(root, "val2017", "panoptic")

    # unreadable image
    (root / "val2017" / "000000142238.jpg").write_bytes(b"not a jpeg")
    json_path.write_text(json.dumps({**data, "images": data["images"][:1], "annotations": data["annotations"][:1]}))
    with pytest.raises(ValueError, match="000000142238.jpg.*142238"):
        load_dataset_for_segmentation(root, "val2017", "panoptic").dataset[0]


def test_images_without_annotations_are_kept(coco_sample_root, tmp_path):
    root = _copy_sample(coco_sample_root, tmp_path)
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 142238]
    path.write_text(json.dumps(data))
    dataset = load_dataset_for_segmentation(root, "val2017", "instance").dataset
    assert len(dataset) == 2
    empty = dataset[0]
    assert empty["image_id"] == "142238" and empty["segment_ids"] == [] and not empty["segment_map"].any()


def test_polygon_instances(coco_sample_root, tmp_path):
    root = _copy_sample(coco_sample_root, tmp_path)
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == 142238][:1]
    data["annotations"][0]["segmentation"] = [[10, 10, 30, 10, 30, 20, 10, 20]]  # a rectangle polygon
    path.write_text(json.dumps(data))
    record = load_dataset_for_segmentation(root, "val2017", "instance").dataset[0]
    rows, cols = np.nonzero(record["segment_map"] == record["segment_ids"][0])
    assert rows.min() >= 10 and rows.max() <= 20 and cols.min() >= 10 and cols.max() <= 30
    assert 150 < len(rows) < 260


def test_rgb_id_round_trip():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 2**24 - 1, 3937500]])
    assert np.array_equal(rgb_to_id(id_to_rgb(ids)), ids)


def test_decode_time_skip_gives_a_placeholder_the_collator_drops(coco_sample_root, tmp_path):
    from mask2former import Mask2FormerImageProcessor
    from mask2former.training.collate import SegmentationCollator

    root = _copy_sample(coco_sample_root, tmp_path)
    png = root / "annotations" / "panoptic_val2017" / "000000142238.png"
    Image.open(png).crop((0, 0, 100, 100)).save(png)
    dataset = load_dataset_for_segmentation(root, "val2017", "panoptic", on_bad_input="skip").dataset
    records = [dataset[0], dataset[1]]
    assert records[0]["skipped"] and not records[1]["skipped"]
    batch = SegmentationCollator(Mask2FormerImageProcessor(do_resize=False), keep_targets=True)(records)
    assert [target["image_id"] for target in batch["targets"]] == ["439180"]
    streamed = load_dataset_for_segmentation(root, "val2017", "panoptic", on_bad_input="skip", streaming=True).dataset
    assert [record["image_id"] for record in streamed if not record["skipped"]] == ["439180"]


def test_set_segmentation_transform(coco_sample_root):
    from mask2former.training.data import set_segmentation_transform
    from mask2former.training.transforms import RandomHorizontalFlip

    dataset = load_dataset_for_segmentation(coco_sample_root, "val2017", "panoptic").dataset
    flipped = set_segmentation_transform(dataset, RandomHorizontalFlip(prob=1.0))
    assert np.array_equal(flipped[0]["segment_map"], dataset[0]["segment_map"][:, ::-1])


def test_optional_dependencies_fail_at_use_with_the_hint(coco_sample_root, monkeypatch):
    import sys

    from mask2former.training.evaluate import InstanceEvaluator

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'mask2former\[train\]'"):
        load_dataset_for_segmentation(coco_sample_root, "val2017", "panoptic")
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    with pytest.raises(ImportError, match=r"pycocotools.*pip install 'mask2former\[train\]'"):
        InstanceEvaluator()


def test_semantic_parquet_dataset(tmp_path):
    """A scene_parse_150-style parquet set: class map with 0 = unlabeled and classes 1..K."""
    import datasets

    annotation = np.zeros((6, 8), dtype=np.uint8)
    annotation[:, :4] = 1
    annotation[:3, 4:] = 3
    Image.fromarray(annotation).save(tmp_path / "a.png")
    Image.fromarray(np.full((6, 8, 3), 90, dtype=np.uint8)).save(tmp_path / "i.png")
    dataset = datasets.Dataset.from_dict({"img": [str(tmp_path / "i.png")], "seg": [str(tmp_path / "a.png")]})
    dataset = dataset.cast_column("img", datasets.Image()).cast_column("seg", datasets.Image())
    (tmp_path / "set").mkdir()
    dataset.to_parquet(str(tmp_path / "set" / "validation.parquet"))
    loaded = load_dataset_for_segmentation(
        str(tmp_path / "set"),
        "validation",
        "semantic",
        annotation_format="semantic",
        id2label={1: "wall", 2: "floor", 3: "sky"},
        column_mapping={"image": "img", "annotation": "seg"},
    )
    info = loaded.label_info
    assert info.id2label == {0: "wall", 1: "floor", 2: "sky"} and info.thing_ids == []
    labels = semantic_label_map(loaded.dataset[0])
    expected = np.full((6, 8), 255)
    expected[:, :4] = 0
    expected[:3, 4:] = 2
    assert np.array_equal(labels, expected)
    # a class value outside id2label is an error naming it, never a silent wrong label
    annotation[0, 0] = 7
    Image.fromarray(annotation).save(tmp_path / "a.png")
    dataset.to_parquet(str(tmp_path / "set" / "validation.parquet"))
    broken = load_dataset_for_segmentation(
        str(tmp_path / "set"),
        "validation",
        "semantic",
        annotation_format="semantic",
        id2label={1: "wall", 2: "floor", 3: "sky"},
        column_mapping={"image": "img", "annotation": "seg"},
    )
    with pytest.raises(ValueError, match="unknown class values \\[7\\]"):
        broken.dataset[0]


def test_hub_unknown_category_raises_or_is_skipped(tmp_path, coco_sample_root):
    folder, categories = _write_parquet(tmp_path, coco_sample_root)
    mapping = {"image": "picture", "annotation": "panoptic", "segments_info": "segments", "image_id": "key"}
    fewer = [category for category in categories if category["id"] != 19]  # image 439180 has horses (19)
    dataset = load_dataset_for_segmentation(
        str(folder), "validation", categories=fewer, column_mapping=mapping
    ).dataset
    assert dataset[0]["image_id"] == "142238"
    with pytest.raises(ValueError, match="439180.*unknown category 19"):
        dataset[1]
    skipping = load_dataset_for_segmentation(
        str(folder), "validation", categories=fewer, column_mapping=mapping, on_bad_input="skip", streaming=True
    ).dataset
    assert [record["image_id"] for record in skipping if not record["skipped"]] == ["142238"]


def test_empty_annotation_list_and_unannotated_image(coco_sample_root, tmp_path):
    root = _copy_sample(coco_sample_root, tmp_path)
    json_path = root / "annotations" / "panoptic_val2017.json"
    data = _panoptic_json(root)
    json_path.write_text(json.dumps({**data, "annotations": []}))
    with pytest.raises(ValueError, match="panoptic_val2017.json has an empty annotation list"):
        load_dataset_for_segmentation(root, "val2017", "panoptic")
    json_path.write_text(json.dumps({**data, "annotations": data["annotations"][:1]}))
    with pytest.raises(ValueError, match="image id 439180 has no panoptic annotation"):
        load_dataset_for_segmentation(root, "val2017", "panoptic")
    assert len(load_dataset_for_segmentation(root, "val2017", "panoptic", on_bad_input="skip").dataset) == 1


def test_hub_labels_from_a_class_label_feature(tmp_path, coco_sample_root):
    import datasets

    data = _panoptic_json(coco_sample_root)
    annotation = data["annotations"][0]
    categories = sorted({s["category_id"] for s in annotation["segments_info"]})
    names = [f"category {category}" for category in categories]
    segment_type = {
        "id": datasets.Value("int64"),
        "category_id": datasets.ClassLabel(names=names),
        "iscrowd": datasets.Value("int64"),
    }
    features = datasets.Features(
        {"image": datasets.Image(), "annotation": datasets.Image(), "segments_info": datasets.List(segment_type)}
    )
    segments = [
        {"id": s["id"], "category_id": categories.index(s["category_id"]), "iscrowd": s["iscrowd"]}
        for s in annotation["segments_info"]
    ]
    row = {
        "image": [str(coco_sample_root / "val2017" / data["images"][0]["file_name"])],
        "annotation": [str(coco_sample_root / "annotations" / "panoptic_val2017" / annotation["file_name"])],
        "segments_info": [segments],
    }
    (tmp_path / "set").mkdir()
    datasets.Dataset.from_dict(row, features=features).to_parquet(str(tmp_path / "set" / "train.parquet"))
    loaded = load_dataset_for_segmentation(str(tmp_path / "set"), "train")
    assert loaded.label_info.id2label == dict(enumerate(names))
    record = loaded.dataset[0]
    assert [names[label] for label in record["class_labels"]] == [
        f"category {s['category_id']}" for s in annotation["segments_info"]
    ]


def test_parquet_with_embedded_bytes_only(tmp_path, coco_sample_root):
    """Hub parquet files carry image bytes with a bare file name as path: the bytes are decoded."""
    import datasets

    data = _panoptic_json(coco_sample_root)
    image_bytes = (coco_sample_root / "val2017" / data["images"][0]["file_name"]).read_bytes()
    png_bytes = (
        coco_sample_root / "annotations" / "panoptic_val2017" / data["annotations"][0]["file_name"]
    ).read_bytes()
    segments = [{k: s[k] for k in ("id", "category_id", "iscrowd")} for s in data["annotations"][0]["segments_info"]]
    rows = {
        "image": [{"bytes": image_bytes, "path": "no/such/dir/a.jpg"}],
        "annotation": [{"bytes": png_bytes, "path": "no/such/dir/a.png"}],
        "segments_info": [segments],
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "annotation": datasets.Image(),
            "segments_info": datasets.List(
                {
                    "id": datasets.Value("int64"),
                    "category_id": datasets.Value("int64"),
                    "iscrowd": datasets.Value("int64"),
                }
            ),
        }
    )
    (tmp_path / "set").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "set" / "train.parquet"))
    record = load_dataset_for_segmentation(str(tmp_path / "set"), "train", categories=data["categories"]).dataset[0]
    reference = load_dataset_for_segmentation(coco_sample_root, "val2017").dataset[0]
    assert np.array_equal(record["segment_map"], reference["segment_map"])
    assert np.array_equal(np.asarray(record["image"]), np.asarray(reference["image"]))


def _instance_root_with_mask(coco_sample_root, tmp_path, segmentation):
    """The COCO sample's instances JSON with the first mask of image 142238 replaced (annotation id 777)."""
    root = _copy_sample(coco_sample_root, tmp_path)
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    first = next(a for a in data["annotations"] if a["image_id"] == 142238)
    first.update(id=777, segmentation=segmentation)
    path.write_text(json.dumps(data))
    return root


@pytest.mark.parametrize(
    "segmentation, problem",
    [
        ([[10, 10, 30, 10]], "polygon"),  # 2 points: pycocotools would read it as a box
        ([[10, 10, 30, 10, 30]], "polygon"),  # an odd number of coordinates: a bare pycocotools exception
        ([], "empty polygon list"),
        ({"size": [427, 640], "counts": "~~~~"}, "RLE counts"),  # garbage: never ends a number
        ({"size": [427, 640], "counts": "52"}, "cover 7 pixels"),  # 5 + 2 of 427 x 640: uninitialised memory
        ({"size": [427, 640], "counts": [5, 2]}, "cover 7 pixels"),
        ({"size": [427, 640], "counts": [5, -2]}, "non-negative"),
        ({"size": [427, 640]}, "neither polygons nor an RLE"),
        (42, "neither polygons nor an RLE"),
    ],
)
def test_bad_instance_masks_name_image_and_annotation(coco_sample_root, tmp_path, segmentation, problem):
    root = _instance_root_with_mask(coco_sample_root, tmp_path, segmentation)
    dataset = load_dataset_for_segmentation(root, "val2017", "instance").dataset
    with pytest.raises(BadExampleError, match=f"annotation 777 of image '142238'.*{problem}"):
        dataset[0]
    assert not dataset[1]["skipped"]  # the other image is unaffected
    skipping = load_dataset_for_segmentation(root, "val2017", "instance", on_bad_input="skip").dataset
    record = skipping[0]
    assert record["skipped"] and "annotation 777" in record["skip_reasons"][0]


def test_a_valid_compressed_rle_still_decodes(coco_sample_root, tmp_path):
    from pycocotools import mask as mask_utils

    mask = np.zeros((427, 640), dtype=np.uint8, order="F")
    mask[100:200, 50:300] = 1
    rle = mask_utils.encode(mask)
    root = _instance_root_with_mask(
        coco_sample_root, tmp_path, {"size": rle["size"], "counts": rle["counts"].decode()}
    )
    record = load_dataset_for_segmentation(root, "val2017", "instance").dataset[0]
    # the first annotation of the image is segment 1: inside the box (smaller instances may cover part of it)
    inside = np.zeros((427, 640), dtype=bool)
    inside[100:200, 50:300] = True
    assert (record["segment_map"] == 1).any() and not ((record["segment_map"] == 1) & ~inside).any()


def _synthetic_root_with_bad_files(tmp_path):
    """synthetic-shapes (5 train images) where image 1 is a 16-bit PNG, 2 is stored sideways with an EXIF turn, 3 is
    truncated, 4 is 1x1 (annotation too) and 5 is a 96x96 'decompression bomb' under a lowered pixel limit."""
    root = generate_synthetic_shapes(tmp_path, seed=1, num_images=5, num_val_images=1, image_size=32)
    images = sorted((root / "train2017").glob("*.png"))
    pngs = sorted((root / "annotations" / "panoptic_train2017").glob("*.png"))
    originals = [np.asarray(Image.open(path).convert("RGB")) for path in images]
    grey = np.asarray(Image.fromarray(originals[0]).convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(images[0])  # 16 bits, the same grey levels
    exif = Image.Image().getexif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view": store it turned the other way
    Image.fromarray(np.rot90(originals[1], k=1)).save(images[1], exif=exif)
    images[2].write_bytes(images[2].read_bytes()[:60])
    for path in (images[3], pngs[3]):
        Image.new("RGB", (1, 1)).save(path)
    for path in (images[4], pngs[4]):
        Image.new("RGB", (96, 96)).save(path)
    return root, images, grey, originals


def test_sixteen_bit_images_are_scaled(tmp_path):
    root, _, grey, _ = _synthetic_root_with_bad_files(tmp_path)
    record = load_dataset_for_segmentation(root, "train").dataset[0]
    assert np.array_equal(np.asarray(record["image"]), np.stack([grey] * 3, axis=-1))  # not clipped to white


def test_exif_orientation_is_applied_to_training_images(tmp_path):
    root, _, _, originals = _synthetic_root_with_bad_files(tmp_path)
    record = load_dataset_for_segmentation(root, "train").dataset[1]
    assert np.array_equal(np.asarray(record["image"]), originals[1])  # upright, aligned with its annotation


def test_bad_image_files_are_reported_and_skipped_per_example(tmp_path, monkeypatch):
    root, images, _, _ = _synthetic_root_with_bad_files(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2048)  # 32 x 32 is fine, 96 x 96 > 2 x 2048 pixels
    strict = load_dataset_for_segmentation(root, "train").dataset
    for index in (2, 3, 4):
        with pytest.raises(BadExampleError, match=images[index].name):
            strict[index]
    skipping = load_dataset_for_segmentation(root, "train", on_bad_input="skip").dataset
    records = [skipping[index] for index in range(5)]
    assert [record["skipped"] for record in records] == [False, False, True, True, True]
    for index in (2, 3, 4):
        assert images[index].name in records[index]["skip_reasons"][0]
    assert "MAX_IMAGE_PIXELS" in records[4]["skip_reasons"][0] and "1x1" in records[3]["skip_reasons"][0]

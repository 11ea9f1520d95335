"""The ImageNet subset: split rule, labels, and a user's own ILSVRC directory."""

from __future__ import annotations

import pytest

from edge_convnext.dataset import load_subset
from edge_convnext.errors import DataError
from edge_convnext.labels import read_labels, write_labels


def test_shared_split_is_fixed_and_disjoint(subset):
    cal, ev = subset.split("calibration"), subset.split("evaluation")
    assert (len(cal), len(ev), len(subset.samples)) == (300, 1000, 1300)
    assert not {s.image_id for s in cal} & {s.image_id for s in ev}
    assert [s.image_id for s in ev] == sorted(s.image_id for s in ev)
    assert cal[0].image_id == "ILSVRC2012_val_00000347.JPEG"  # stable across runs and machines
    assert subset.ids_sha256("evaluation") == load_subset().ids_sha256("evaluation")
    assert subset.class_names is not None and len(subset.class_names) == 1000
    assert subset.class_names[0].startswith("tench")


def test_labels_agree_with_the_50k_ground_truth(subset):
    gt = subset.root / "imagenet_val" / "ILSVRC2012_val_ground_truth_50000.txt"
    truth = dict(line.split() for line in gt.read_text().splitlines())
    assert all(int(truth[s.image_id]) == s.label for s in subset.samples)


def test_user_directory_with_ground_truth(tmp_path, subset):
    d = tmp_path / "val"
    d.mkdir()
    for s in subset.samples[:26]:
        (d / s.image_id).symlink_to(s.path)
    gt = subset.root / "imagenet_val" / "ILSVRC2012_val_ground_truth_50000.txt"
    mine = load_subset(d, ground_truth=gt)
    assert len(mine.samples) == 26
    assert [s.label for s in mine.samples] == [s.label for s in subset.samples[:26]]
    assert len(mine.split("calibration")) == 6 and len(mine.split("evaluation")) == 20


def test_user_class_directories(tmp_path, subset):
    d = tmp_path / "val"
    wnids = [line.split()[0] for line in (subset.root / "labels" / "synset_words.txt").read_text().splitlines()]
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "synset_words.txt").symlink_to(subset.root / "labels" / "synset_words.txt")
    for s in subset.samples[:5]:
        (d / wnids[s.label]).mkdir(parents=True, exist_ok=True)
        (d / wnids[s.label] / s.image_id).symlink_to(s.path)
    mine = load_subset(d)
    assert {(s.image_id, s.label) for s in mine.samples} == {(s.image_id, s.label) for s in subset.samples[:5]}


def test_devkit_ground_truth_is_explained(tmp_path, subset):
    d = tmp_path / "val"
    d.mkdir()
    (d / subset.samples[0].image_id).symlink_to(subset.samples[0].path)
    (d / "val.txt").write_text("490\n361\n")
    with pytest.raises(DataError, match="devkit"):
        load_subset(d)


def test_missing_data_dir_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="--data"):
        load_subset(tmp_path / "nowhere")


def test_labels_file_round_trip(tmp_path):
    write_labels(tmp_path / "labels.txt", ["tench, Tinca tinca", "goldfish"])
    assert read_labels(tmp_path / "labels.txt") == ["tench, Tinca tinca", "goldfish"]
    with pytest.raises(ValueError):
        write_labels(tmp_path / "bad.txt", ["a\nb"])

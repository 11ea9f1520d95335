"""The ImageNet validation subset: images, labels, class names, and a fixed calibration/evaluation split.

Two layouts are read:

* the project's shared data (``<data>/imagenet_val/acuity_1300/dataset.txt`` + ``data/*.JPEG``,
  ``<data>/labels/synset_words.txt``), located beside the repository or given with ``--data``;
* a user's own ILSVRC2012 validation directory: ``ILSVRC2012_val_*.JPEG`` files with a ground-truth
  file of ``<file name> <label 0-999>`` lines (sorted-wnid order, as in Caffe/PyTorch/HF), or
  per-class ``n0xxxxxxx/`` sub-directories.

The split is a stable rule, independent of anything random: images sorted by file name, position
``i`` goes to calibration when ``i % 13 < 3``, otherwise to evaluation. On the 1300 shared images this
is exactly 300 calibration and 1000 evaluation images, disjoint and spread over the whole list.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge_convnext.errors import DataError
from edge_convnext.fileio import display_path
from edge_convnext.labels import read_synset_words

Split = Literal["calibration", "evaluation", "all"]
SPLIT_RULE = "images sorted by file name; position i is calibration when i % 13 < 3, else evaluation"
DATA_ENV = "EDGE_CONVNEXT_DATA"
_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".webp", ".bmp"}
_GROUND_TRUTH_NAMES = ("ILSVRC2012_val_ground_truth_50000.txt", "val.txt", "ground_truth.txt")


@dataclass(frozen=True)
class Sample:
    """One labelled image; ``image_id`` is its file name (the key of stored reference logits)."""

    image_id: str
    path: Path
    label: int


@dataclass(frozen=True)
class ImageNetSubset:
    root: Path
    samples: tuple[Sample, ...]
    class_names: tuple[str, ...] | None
    description: str
    wnids: tuple[str, ...] | None = None  # WordNet ids in class order, when synset_words.txt gave them

    def split(self, which: Split) -> list[Sample]:
        """The calibration or evaluation images (see `SPLIT_RULE`), or all of them."""
        if which == "all":
            return list(self.samples)
        cal = which == "calibration"
        return [s for i, s in enumerate(self.samples) if (i % 13 < 3) == cal]

    def ids_sha256(self, which: Split) -> str:
        """Hash of the split's image ids, recorded in manifests to identify the images used."""
        return ids_sha256(self.split(which))


def ids_sha256(samples: list[Sample]) -> str:
    """sha256 of the samples' image ids, one per line, in order."""
    return hashlib.sha256("\n".join(s.image_id for s in samples).encode()).hexdigest()


def image_directory(path: Path) -> list[Sample]:
    """Every image under ``path`` (recursively), sorted by relative path, unlabelled (label -1).

    For a user's own calibration images (``convert --calibration DIR``): their domain, no labels needed.
    The image id is the path relative to ``path``, so two sub-directories may hold the same file name.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{display_path(root)}: calibration directory does not exist; pass --calibration DIR "
                        "with a directory of your own images")
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{display_path(root)}: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) found; pass "
                        "--calibration with a directory of your own images")
    return [Sample(f.relative_to(root).as_posix(), f, -1) for f in files]


def locate_data_dir(explicit: Path | None = None) -> Path:
    """``explicit``, else ``$EDGE_CONVNEXT_DATA``, else ``shared/data`` beside this checkout or the cwd."""
    if explicit is not None:
        p = Path(explicit)
        if not p.is_dir():
            raise DataError(f"{p}: data directory does not exist; pass --data DIR with ImageNet val images")
        return p
    if os.environ.get(DATA_ENV):
        return locate_data_dir(Path(os.environ[DATA_ENV]))
    repo = Path(__file__).resolve().parents[1]
    cwd = Path.cwd().resolve()
    for base in (repo, cwd, *list(cwd.parents)[:3]):
        for cand in (base / "shared" / "data", base.parent / "shared" / "data"):
            if (cand / "imagenet_val").is_dir():
                return cand
    raise DataError(
        "no ImageNet validation data found (looked for ../shared/data beside the repository); "
        f"pass --data DIR or set {DATA_ENV}"
    )


def load_subset(data: Path | None = None, ground_truth: Path | None = None) -> ImageNetSubset:
    """Read the shared subset or a user's ILSVRC2012 validation directory (see module doc)."""
    root = locate_data_dir(data)
    acuity = root / "imagenet_val" / "acuity_1300"
    if (acuity / "dataset.txt").is_file() and ground_truth is None:
        return _load_acuity(root, acuity)
    if (root / "dataset.txt").is_file() and ground_truth is None:
        return _load_acuity(root, root)
    return _load_ilsvrc_dir(root, ground_truth)


def _class_names(*candidates: Path) -> tuple[tuple[str, ...] | None, list[str] | None]:
    for c in candidates:
        if c.is_file():
            wnids, names = read_synset_words(c)
            return tuple(names), wnids
    return None, None


def _load_acuity(root: Path, acuity: Path) -> ImageNetSubset:
    listing = acuity / "dataset.txt"
    samples = []
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rel, label = (t.strip() for t in line.split(","))
            samples.append(Sample(Path(rel).name, acuity / rel, _label(label)))
        except ValueError as e:
            raise DataError(f"{listing}:{n}: expected './data/<file>, <label>', got {line!r}") from e
    names, wnids = _class_names(root / "labels" / "synset_words.txt", acuity / "synset_words.txt")
    return _finish(root, samples, names, f"ILSVRC2012 val subset at {display_path(acuity)} ({len(samples)} images, "
                   "prescaled 227x227)", wnids)


def _load_ilsvrc_dir(root: Path, ground_truth: Path | None) -> ImageNetSubset:
    names, wnids = _class_names(root / "synset_words.txt", root.parent / "labels" / "synset_words.txt")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("n") and d.name[1:].isdigit())
    if class_dirs and ground_truth is None:
        order = wnids or [d.name for d in class_dirs]
        if len(order) != 1000 and not wnids:
            raise DataError(f"{root}: {len(order)} class directories; need all 1000 wnids or a synset_words.txt")
        index = {w: i for i, w in enumerate(order)}
        samples = [
            Sample(f.name, f, index[d.name])
            for d in class_dirs
            for f in sorted(d.iterdir())
            if f.suffix.lower() in _IMAGE_SUFFIXES and d.name in index
        ]
        return _finish(root, samples, names, f"ILSVRC2012 val class directories at {display_path(root)}", wnids)

    gt = ground_truth or next((root / n for n in _GROUND_TRUTH_NAMES if (root / n).is_file()), None)
    if gt is None:
        raise DataError(
            f"{root}: no ground-truth file; pass --ground-truth FILE with '<file name> <label 0-999>' lines "
            f"(or put one of {', '.join(_GROUND_TRUTH_NAMES)} in the directory)"
        )
    labels = _read_ground_truth(Path(gt))
    files = {f.name: f for f in root.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES}
    if not files:
        raise DataError(f"{root}: no images (.JPEG/.jpg/.png) in the directory")
    missing = [name for name in files if name not in labels]
    if missing:
        raise DataError(f"{gt}: no label for {len(missing)} image(s), e.g. {missing[:3]}")
    samples = [Sample(name, f, labels[name]) for name, f in files.items()]
    return _finish(root, samples, names, f"ILSVRC2012 val images at {display_path(root)} labelled by {display_path(Path(gt))}",
                   wnids)


def _read_ground_truth(path: Path) -> dict[str, int]:
    labels: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read ground truth ({e.strerror})") from e
    for n, line in enumerate(lines, 1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        if len(parts) == 1:
            raise DataError(
                f"{path}:{n}: a bare label: this looks like the devkit's ILSVRC2012_validation_ground_truth.txt, "
                "whose ILSVRC ids are not in sorted-wnid order. Use a '<file name> <label 0-999>' file "
                "(for example the common val.txt) instead"
            )
        try:
            labels[Path(parts[0]).name] = _label(parts[1])
        except ValueError as e:
            raise DataError(f"{path}:{n}: expected '<file name> <label 0-999>', got {line!r}") from e
    return labels


def _label(text: str) -> int:
    v = int(text)
    if not 0 <= v < 1000:
        raise ValueError(f"label {v} outside 0..999")
    return v


def _finish(root: Path, samples: list[Sample], names: tuple[str, ...] | None, description: str,
            wnids: list[str] | None = None) -> ImageNetSubset:
    if not samples:
        raise DataError(f"{root}: no labelled images found")
    samples.sort(key=lambda s: s.image_id)
    dup = sorted(k for k, n in Counter(s.image_id for s in samples).items() if n > 1)
    if dup:
        raise DataError(f"{root}: duplicate image file names {dup[:3]}; ids must be unique")
    return ImageNetSubset(root, tuple(samples), names, description, tuple(wnids) if wnids else None)

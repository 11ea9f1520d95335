"""Class names: ``labels.txt`` in class-index order (line i is class i), one per artifact directory."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from edge_convnext.errors import DataError
from edge_convnext.fileio import write_text_atomic

LABELS_FILE = "labels.txt"


def read_labels(path: Path) -> list[str]:
    """Read ``labels.txt``: one class name per line, line i is class index i."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read labels ({e.strerror}); re-run convert to write it") from e
    labels = [ln.strip() for ln in lines if ln.strip()]
    if not labels:
        raise DataError(f"{path}: labels file is empty; re-run convert to write it")
    return labels


def write_labels(path: Path, labels: Sequence[str]) -> None:
    bad = [i for i, name in enumerate(labels) if "\n" in name or not name.strip()]
    if bad:
        raise ValueError(f"class names must be non-empty single lines; bad indices: {bad[:5]}")
    write_text_atomic(Path(path), "".join(f"{name}\n" for name in labels))


def unique_labels(names: Sequence[str], ids: Sequence[str] | None = None) -> list[str]:
    """Class names with every repeated name made unique: ``"crane (n02012849)"``.

    ImageNet names two classes ``crane`` (the bird, the machine). Consumers that key scores by label
    (Core ML's probabilities dictionary, MediaPipe's category names) would merge or confuse them, so
    each repeated name gets its WordNet id from ``ids`` (or ``class <i>`` without ids) appended; all
    other names stay as they are.
    """
    counts = Counter(names)
    out = [f"{n} ({ids[i] if ids else f'class {i}'})" if counts[n] > 1 else n for i, n in enumerate(names)]
    if len(set(out)) != len(out):
        raise ValueError("class names are still not unique after adding ids; check the labels source")
    return out


def read_synset_words(path: Path) -> tuple[list[str], list[str]]:
    """Read ILSVRC ``synset_words.txt`` (``<wnid> <names>`` per line) -> (wnids, class names)."""
    path = Path(path)
    wnids, names = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read class names ({e.strerror})") from e
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not (wnid.startswith("n") and name):
            raise DataError(f"{path}:{n}: expected '<wnid> <class names>', got {line!r}")
        wnids.append(wnid)
        names.append(name.strip())
    return wnids, names


def labels_from_id2label(id2label: dict[int, str] | dict[str, str] | None) -> list[str] | None:
    """Class names from an HF config's ``id2label``, or None when they are HF's placeholders."""
    if not id2label:
        return None
    items = sorted((int(k), str(v)) for k, v in id2label.items())
    if [k for k, _ in items] != list(range(len(items))):
        return None
    names = [v for _, v in items]
    if all(v == f"LABEL_{i}" for i, v in enumerate(names)):
        return None
    return names

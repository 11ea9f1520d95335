"""TFLite Model Metadata for an image classifier, written with the official schema.

What MediaPipe Tasks' ``ImageClassifier`` (and the old TFLite Task Library) read, per the
``metadata_schema.fbs`` that ships in the ``mediapipe`` wheel:

* a ``TFLITE_METADATA`` entry in the model's ``metadata`` list whose buffer is a ``ModelMetadata``
  flatbuffer (file identifier ``M001``): name, description, version, author, license, one subgraph
  with the input's ``ImageProperties`` (RGB) and ``NormalizationOptions`` and the output's
  ``TENSOR_AXIS_LABELS`` associated file;
* the associated files themselves in a zip appended to the flatbuffer, every entry stored
  uncompressed (MediaPipe refuses deflated entries: "Expected uncompressed zip archive").

The metadata is described with MediaPipe's own info objects (``metadata_writers.metadata_info``:
``GeneralMd``, ``InputImageTensorMd``, ``ClassificationTensorMd``, ``LabelFileMd``), which import
only the schema modules. MediaPipe's ``MetadataWriter``/``MetadataPopulator`` cannot be used: they
import ``_pywrap_metadata_version``, a C extension the 1.2.3 wheel lacks. So this module does the
populator's two remaining steps itself (pack the ``ModelMetadata`` buffer, attach it to the model
and append the zip) and sets ``min_parser_version`` to the schema version of the newest field used
(`MIN_PARSER_VERSION`), which the populator would have computed.

`validate` re-reads what was written and refuses, with a message naming the problem, anything a
consumer would refuse: it runs before the artifact is renamed into place, so a refused file is never
written.
"""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from dataclasses import dataclass
from typing import Any

import flatbuffers

from edge_convnext.errors import EdgeConvNextError

METADATA_NAME = "TFLITE_METADATA"
METADATA_IDENTIFIER = b"M001"
# Every field used here (ImageProperties, NormalizationOptions, stats, AssociatedFile of type
# TENSOR_AXIS_LABELS / DESCRIPTIONS) exists since schema 1.0.0; nothing newer (no process units on the
# subgraph, tensor groups, custom metadata or file versions) is written.
MIN_PARSER_VERSION = "1.0.0"


class MetadataError(EdgeConvNextError):
    """The model metadata would be refused by a consumer; the artifact is not written."""


@dataclass(frozen=True)
class ClassifierMetadata:
    """What the metadata says about one image-classifier artifact."""

    name: str
    description: str
    version: str
    author: str
    license: str
    input_description: str
    output_description: str
    labels_file: str
    labels: tuple[str, ...]
    extra_files: tuple[tuple[str, str], ...] = ()  # (file name, description): e.g. the manifest
    norm_mean: float = 0.0
    norm_std: float = 255.0


def _schema() -> tuple[Any, Any]:
    try:
        from mediapipe.tasks.metadata import metadata_schema_py_generated as mfb
        from mediapipe.tasks.python.metadata.metadata_writers import metadata_info as mi
    except ImportError as e:
        raise MetadataError(
            "writing TFLite Model Metadata needs the metadata schema from the 'mediapipe' package "
            f"({e}); install the converter extra: pip install 'edge-convnext[convert]'") from e
    return mfb, mi


def metadata_buffer(md: ClassifierMetadata, input_is_float: bool = True) -> bytes:
    """The ``ModelMetadata`` flatbuffer (``M001``) for ``md``."""
    mfb, mi = _schema()
    from mediapipe.tasks.metadata import schema_py_generated as sfb

    general = mi.GeneralMd(name=md.name, version=md.version, description=md.description, author=md.author,
                           licenses=md.license).create_metadata()
    image = mi.InputImageTensorMd(
        name="image", description=md.input_description,
        norm_mean=[md.norm_mean] if input_is_float else None, norm_std=[md.norm_std] if input_is_float else None,
        color_space_type=mfb.ColorSpaceType.RGB,
        tensor_type=sfb.TensorType.FLOAT32 if input_is_float else sfb.TensorType.UINT8,
    ).create_metadata()
    scores = mi.ClassificationTensorMd(
        name="probabilities", description=md.output_description,
        label_files=[mi.LabelFileMd(file_path=md.labels_file)], tensor_type=sfb.TensorType.FLOAT32,
    ).create_metadata()
    subgraph = mfb.SubGraphMetadataT()
    subgraph.inputTensorMetadata = [image]
    subgraph.outputTensorMetadata = [scores]
    files = []
    for name, description in md.extra_files:
        f = mfb.AssociatedFileT()
        f.name, f.description, f.type = name, description, mfb.AssociatedFileType.DESCRIPTIONS
        files.append(f)
    subgraph.associatedFiles = files or None
    general.subgraphMetadata = [subgraph]
    general.minParserVersion = MIN_PARSER_VERSION
    b = flatbuffers.Builder(0)
    b.Finish(general.Pack(b), METADATA_IDENTIFIER)
    return bytes(b.Output())


def stored_zip(files: dict[str, bytes]) -> bytes:
    """A zip of ``files``, every entry stored uncompressed with a fixed date (same inputs, same bytes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            z.writestr(info, data)
    return out.getvalue()


def read_model_metadata(model: bytes) -> Any:
    """The ``ModelMetadataT`` in a ``.tflite``'s ``TFLITE_METADATA`` entry, or None."""
    mfb, _ = _schema()
    from ai_edge_litert import schema_py_generated as schema

    m = schema.Model.GetRootAs(model, 0)
    for i in range(m.MetadataLength()):
        entry = m.Metadata(i)
        if entry.Name().decode("utf-8") != METADATA_NAME:
            continue
        buf = m.Buffers(entry.Buffer())
        data = model[buf.Offset(): buf.Offset() + buf.Size()] if buf.Offset() > 1 else buf.DataAsNumpy().tobytes()
        if not mfb.ModelMetadata.ModelMetadataBufferHasIdentifier(data, 0):
            raise MetadataError(f"{METADATA_NAME} buffer lacks the {METADATA_IDENTIFIER.decode()} identifier")
        return mfb.ModelMetadataT.InitFromObj(mfb.ModelMetadata.GetRootAs(data, 0))
    return None


def validate(model: bytes, num_classes: int, where: str) -> dict[str, Any]:
    """Check a finished ``.tflite`` as MediaPipe would read it; `MetadataError` naming ``where`` otherwise.

    Checks: one ``TFLITE_METADATA`` with one subgraph, one input and one output tensor entry; RGB
    image properties and one-value normalization on the input; a TENSOR_AXIS_LABELS file on the
    output whose lines are ``num_classes`` unique labels; every associated file present in the
    appended zip and stored uncompressed. Returns a summary for the manifest.
    """
    mfb, _ = _schema()
    md = read_model_metadata(model)
    if md is None:
        raise MetadataError(f"{where}: no {METADATA_NAME} entry: MediaPipe would find no labels or normalization")
    if len(md.subgraphMetadata or []) != 1:
        raise MetadataError(f"{where}: metadata has {len(md.subgraphMetadata or [])} subgraphs; MediaPipe needs 1")
    sg = md.subgraphMetadata[0]
    if len(sg.inputTensorMetadata or []) != 1 or len(sg.outputTensorMetadata or []) != 1:
        raise MetadataError(f"{where}: metadata must describe exactly 1 input and 1 output tensor")
    image, scores = sg.inputTensorMetadata[0], sg.outputTensorMetadata[0]
    props = image.content.contentProperties if image.content else None
    if props is None or getattr(props, "colorSpace", None) != mfb.ColorSpaceType.RGB:
        raise MetadataError(f"{where}: the input tensor metadata has no RGB ImageProperties")
    norms = [u.options for u in image.processUnits or []
             if u.optionsType == mfb.ProcessUnitOptions.NormalizationOptions]
    for n in norms:
        if len(n.mean) != 1 or len(n.std) != 1:
            raise MetadataError(f"{where}: per-channel normalization (mean {list(n.mean)}, std {list(n.std)}) is "
                                "refused by MediaPipe ('Per-channel image normalization is not available')")
    try:
        archive = zipfile.ZipFile(io.BytesIO(model))
    except zipfile.BadZipFile as e:
        raise MetadataError(f"{where}: no associated-file zip after the flatbuffer ({e})") from e
    with archive:
        infos = {i.filename: i for i in archive.infolist()}
        deflated = [n for n, i in infos.items() if i.compress_type != zipfile.ZIP_STORED]
        if deflated:
            raise MetadataError(f"{where}: zip entries {deflated} are compressed; MediaPipe refuses them "
                                "('Expected uncompressed zip archive'): store every entry uncompressed")
        named = [_s(f.name) for f in (scores.associatedFiles or []) + (sg.associatedFiles or [])]
        missing = [n for n in named if n not in infos]
        if missing:
            raise MetadataError(f"{where}: metadata names associated files {missing} that the zip lacks")
        label_files = [_s(f.name) for f in scores.associatedFiles or []
                       if f.type == mfb.AssociatedFileType.TENSOR_AXIS_LABELS]
        if len(label_files) != 1:
            raise MetadataError(f"{where}: the output needs exactly 1 TENSOR_AXIS_LABELS file, has {label_files}")
        labels = archive.read(label_files[0]).decode("utf-8").splitlines()
    if len(labels) != num_classes:
        raise MetadataError(f"{where}: {label_files[0]} has {len(labels)} labels but the output has {num_classes} "
                            "classes: MediaPipe would name the wrong classes")
    repeated = sorted(x for x, n in Counter(labels).items() if n > 1)
    if repeated:
        raise MetadataError(f"{where}: {label_files[0]} repeats labels {repeated[:5]}; category names must be unique")
    return {"schema": f"TFLite Model Metadata (mediapipe metadata_schema.fbs), min_parser_version {_s(md.minParserVersion)}",
            "name": _s(md.name), "input": {"color_space": "RGB",
                                           "normalization": [{"mean": [float(v) for v in n.mean], "std": [float(v) for v in n.std]} for n in norms]},
            "output_labels": label_files[0], "associated_files": sorted(infos)}


def _s(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)

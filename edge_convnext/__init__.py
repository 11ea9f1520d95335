"""edge-convnext: ConvNeXt-Tiny on phones and small boards.

The package root stays light (NumPy and Pillow only): a Raspberry Pi imports it to preprocess images,
read manifests and run artifacts. Torch and the converters load only in ``converters`` when converting.
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # noqa: ANN202 - lazy, so `import edge_convnext` stays as light as before
    if name == "Classifier":
        from edge_convnext.classify import Classifier

        return Classifier
    raise AttributeError(f"module 'edge_convnext' has no attribute {name!r}")


__all__ = ["Classifier", "__version__"]

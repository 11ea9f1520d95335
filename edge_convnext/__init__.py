"""edge-convnext: ConvNeXt-Tiny on phones and small boards.

The package root stays light (NumPy and Pillow only): a Raspberry Pi imports it to preprocess images,
read manifests and run artifacts. Torch and the converters load only in ``converters`` when converting.
"""

__version__ = "0.1.0"

"""Converters: ConvNeXt-T to Core ML, TFLite/LiteRT and ExecuTorch (build host only: imports torch).

Every build is the same short pipeline: load weights -> export model (normalization folded) ->
[quantize: calibrate on real calibration images] -> lower -> serialize -> manifest + parity check.
One module per backend under ``converters/backends``; `converters.build` drives them.
"""

"""Runners: one small module per runtime behind one protocol (see `base`)."""

from edge_convnext.runners.base import Runner, open_runner

__all__ = ["Runner", "open_runner"]

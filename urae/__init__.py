"""URAE for FLUX: the library shared by the training and inference entry points."""

__version__ = "0.1.0"

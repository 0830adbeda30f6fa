"""carlos: a training harness for tiny byte-level GPTs on PyTorch Lightning and Hydra."""

__version__ = "0.1.0"

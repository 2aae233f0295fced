"""FLUX image-generation worker: one process, one GPU, one pipeline behind a bounded queue."""
__version__ = "0.1.0"

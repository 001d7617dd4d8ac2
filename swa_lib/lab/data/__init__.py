"""Data shipped with the package: the small text corpus of the tiny language model (see README.md)."""

"""Radiographs listed in a CSV -> TFDS (``python -m data_prep.manifest``; docs/DATASETS.md)."""

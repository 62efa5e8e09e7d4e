"""OAI knee radiographs -> TFDS (``python -m data_prep.oai``; see docs/DATASETS.md).

Modules: ``readings`` (KL/OARSI readings in every published form), ``tree`` (the image
tree, BoneFinder points, KNEEL's CSV), ``builder`` (the TFDS builder ``oai``).
"""

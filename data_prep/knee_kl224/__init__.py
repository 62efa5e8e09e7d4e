"""Chen's kneeKL224 knee crops -> TFDS (``python -m data_prep.knee_kl224``; docs/DATASETS.md)."""

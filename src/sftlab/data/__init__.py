"""Data: files -> records (formats.py) -> token ids with labels (tokenize.py) -> batches (collate.py)."""

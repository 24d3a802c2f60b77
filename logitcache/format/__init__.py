"""The cache format: manifest dataclasses and their validation, the value codecs, the dataset card and the tokenizer fingerprint. Imports nothing of storage, read or write."""

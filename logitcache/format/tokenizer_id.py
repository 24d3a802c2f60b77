"""The identity of a tokenizer, shared by the writer side and the reader side.

`dump` records this fingerprint in the manifest (``tokenizer.fingerprint``); a trainer checks a
tokenizer against it before training. It is reader-side code: it imports neither transformers
nor any teacher or writer module, and works on any object with the Hugging Face tokenizer
interface (``backend_tokenizer`` for fast tokenizers, else ``get_vocab``/``all_special_tokens``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["tokenizer_fingerprint"]


def tokenizer_fingerprint(tok: Any) -> str:
    """sha256 hex digest such that two tokenizers with the same one tokenize identically.

    The fingerprint hashes the vocabulary, merges, added/special tokens, normaliser and
    pre-tokeniser of the fast tokenizer's canonical JSON, and nothing that does not change the
    ids (such as the file's formatting or the name it was saved under).
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        keep = {k: spec.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer")}
    else:
        keep = {"vocab": tok.get_vocab(), "special": tok.all_special_tokens}
    canonical = json.dumps(keep, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()

"""Writing caches: the local and remote writers (one commit protocol), merge and export."""

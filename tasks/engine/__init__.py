"""The engine: the Stage contract and its runner, declared identity (code digests, the store's format),
the one config loader, progress reporting. Knows no stage."""

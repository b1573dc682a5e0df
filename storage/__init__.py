"""The versioned dataset store over fsspec: manifests, lineage, Parquet and WebDataset shard I/O.

Knows nothing of models or Prefect.
"""
from .fs import StoreIOError
from .store import (FORMAT_VERSION, PartRecord, Store, StoreError, Version, VersionNotFound, VersionWriter, digest,
                    shard_name, version_id)

__all__ = ["FORMAT_VERSION", "StoreIOError", "PartRecord", "Store", "StoreError", "Version", "VersionNotFound", "VersionWriter", "digest",
           "shard_name", "version_id"]

"""Feature stores: the one place that knows how features are laid out on disk and on object storage.

| module | owns |
| --- | --- |
| `schema` | datasets, attributes and digests of every store file (single file, part, shard, manifest) |
| `reader` | `FeatureStore.open()`: local or object storage x single file, sharded or a collection; `verify()` |
| `writer` | the writer contract (plan -> write part -> commit / abort) and the single-file writer |
| `shards` | sharded stores: `write_shard` (where the rows are) and `ShardedStoreWriter` (the manifest) |
| `objects` | stores on object storage: the self-healing read cache and the staged write |
| `collection` | a store of stores: its format and rules; `collect()` writes one (`reader` reads it as one store) |

Example:
    >>> from embedfit.storage import FeatureStore            # doctest: +SKIP
    >>> with FeatureStore.open("feats.h5") as store:         # doctest: +SKIP
    ...     X, y, paths = store.load()
"""

from embedfit.storage.collection import collect
from embedfit.storage.reader import FeatureStore, StoreCollection, is_collection
from embedfit.storage.schema import (
    CONTENT_HASH,
    FAILED,
    MISSING,
    OK,
    STATUS_NAMES,
    StoreSettings,
    check_mixable,
    library_versions,
    shards_dir,
)
from embedfit.storage.shards import ShardedStoreWriter, shard_size_of, write_shard
from embedfit.storage.writer import ResumePlan, StoreWriter

open_store = FeatureStore.open
"""Open any store for reading (`FeatureStore.open`)."""

__all__ = ["CONTENT_HASH", "FAILED", "MISSING", "OK", "STATUS_NAMES", "FeatureStore", "ResumePlan",
           "ShardedStoreWriter", "StoreCollection", "StoreSettings", "StoreWriter", "check_mixable", "collect",
           "is_collection", "library_versions", "open_store", "shard_size_of", "shards_dir", "write_shard"]

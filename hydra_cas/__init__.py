"""hydra_cas: a versioned, content-addressed store for model weights.

>>> from hydra_cas import Store
>>> store = Store("./hydra_models")
>>> store.save("my-model", "1.0.0", {"w": weights})      # doctest: +SKIP
>>> store.load("my-model", "latest")                      # doctest: +SKIP
"""

from __future__ import annotations

import logging

from hydra_cas.errors import (
    HydraError,
    IntegrityError,
    InvalidArgumentError,
    InvalidMetadataError,
    InvalidNameError,
    InvalidSafetensorsError,
    InvalidTensorError,
    InvalidVersionError,
    LockTimeoutError,
    ManifestError,
    NotFoundError,
    RefInUseError,
    StorageError,
    VersionExistsError,
)
from hydra_cas.facade import ModelPersistenceManager
from hydra_cas.records import LoadResult, SaveResult, VersionInfo
from hydra_cas.store import DEFAULT_STORE, Store

__all__ = [
    "Store",
    "DEFAULT_STORE",
    "ModelPersistenceManager",
    "SaveResult",
    "VersionInfo",
    "LoadResult",
    "HydraError",
    "IntegrityError",
    "InvalidArgumentError",
    "RefInUseError",
    "InvalidMetadataError",
    "InvalidNameError",
    "InvalidSafetensorsError",
    "InvalidTensorError",
    "InvalidVersionError",
    "LockTimeoutError",
    "ManifestError",
    "NotFoundError",
    "StorageError",
    "VersionExistsError",
    "__version__",
]

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

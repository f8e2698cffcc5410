"""``ModelPersistenceManager``: the prototype's API, kept so its users' code runs.

A thin layer over :class:`~hydra_cas.store.Store` with the prototype's method
names, parameters and return shapes.  Like the prototype it reports failures by
logging and returning ``None``/``False`` instead of raising; new code should use
``Store``, which raises ``HydraError``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from hydra_cas.errors import HydraError, IntegrityError
from hydra_cas.store import Store

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable

    import numpy as np

__all__ = ["ModelPersistenceManager"]

logger = logging.getLogger(__name__)


class ModelPersistenceManager:
    """Save, version and load models in ``base_storage_path`` (prototype API)."""

    def __init__(
        self, base_storage_path: str | os.PathLike[str] = "hydra_models", max_workers: int | None = None
    ) -> None:
        self.store = Store(base_storage_path)
        self.base_storage_path = self.store.root
        self.max_workers = max_workers

    def save_model(
        self,
        model_name: str,
        version: str,
        model_data: dict[str, np.ndarray],
        metadata: dict[str, Any] | None = None,
    ) -> bool:
        """Save a version; True on success, False (with the reason logged) otherwise."""
        try:
            self.store.save(model_name, version, model_data, metadata=metadata)
        except HydraError as exc:
            logger.error("Failed to save model '%s:%s': %s", model_name, version, exc)
            return False
        return True

    def load_model(self, model_name: str, version: str = "latest") -> dict[str, np.ndarray] | None:
        """The model's tensors, or None if it is missing or fails its checksum."""
        try:
            return self.store.load(model_name, version, verify="fast")
        except IntegrityError as exc:
            # Store.load has already logged the mismatch at CRITICAL.
            logger.debug("load of %s:%s refused: %s", model_name, version, exc)
            return None
        except HydraError as exc:
            logger.error("Failed to load model '%s:%s': %s", model_name, version, exc)
            return None

    def list_models(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(name, version, record) for every stored version."""
        return [(v.name, v.version, v.to_dict()) for v in self.store.list()]

    def load_models_parallel(
        self, models_to_load: Iterable[tuple[str, str]]
    ) -> dict[str, dict[str, np.ndarray]]:
        """Load several models at once; keyed ``"name:version"``.  Failures are logged and left out."""
        results = self.store.load_many(list(models_to_load), max_workers=self.max_workers)
        return {key: r.tensors for key, r in results.items() if r.ok and r.tensors is not None}

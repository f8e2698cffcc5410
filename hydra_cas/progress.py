"""Progress bars for long operations, shown only when asked (the CLI asks on a terminal)."""

from __future__ import annotations

from typing import Any

__all__ = ["Progress", "progress_bar"]


class Progress:
    """A do-nothing bar with tqdm's ``update``/``close`` surface."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, *, enabled: bool, unit: str = "B") -> Any:
    """A tqdm bar on stderr when ``enabled``; otherwise a silent stand-in."""
    if not enabled:
        return Progress()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but a broken install should not stop work
        return Progress()
    scale = unit == "B"
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=scale,
        unit_divisor=1024 if scale else 1000,
        leave=False,
        dynamic_ncols=True,
    )

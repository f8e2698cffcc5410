"""``python -m hydra_cas``: the same as the ``hydra-cas`` command."""

from __future__ import annotations

import sys

from hydra_cas.cli import main

if __name__ == "__main__":
    sys.exit(main())

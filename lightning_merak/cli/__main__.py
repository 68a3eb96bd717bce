"""``python -m lightning_merak.cli``: the same as the ``lightning-merak`` command."""

import sys

from lightning_merak.cli import main

sys.exit(main())

"""``python -m zotune`` (and ``torchrun -m zotune``) is the ``zotune`` command."""
import sys

from .cli import main

sys.exit(main())

"""``python -m fused_optim`` runs the ``fused-optim`` command."""

import sys

from .cli import main

sys.exit(main())

"""``python -m sseproxy``: the same as the ``sseproxy`` command."""

import sys

from .cli import main

sys.exit(main())

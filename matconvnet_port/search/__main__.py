"""``python -m matconvnet_port.search``: see :mod:`matconvnet_port.search.cli`."""

import sys

from .cli import main

sys.exit(main())

"""``python -m launcher`` works like the ``launcher`` console script."""

import sys

from .cli import main

sys.exit(main())

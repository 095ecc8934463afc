"""``python -m launcher`` works like the ``launcher`` console script."""

from .cli import console

console()

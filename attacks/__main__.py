"""``python -m attacks`` is ``python -m attacks.audit``."""

from .audit import main

main()

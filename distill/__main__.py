"""Entry point for ``python -m distill``."""

from .cli import main

raise SystemExit(main())

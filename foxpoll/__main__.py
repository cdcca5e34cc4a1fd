"""``python -m foxpoll``: the ``foxpoll`` command."""

from .cli import main

raise SystemExit(main())

"""``python -m attnlab.cli``: the ``attnlab`` command."""

from attnlab.cli import main

raise SystemExit(main())

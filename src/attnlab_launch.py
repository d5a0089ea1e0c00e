"""The ``attnlab`` command's entry point, outside the package on purpose.

Importing :mod:`attnlab` imports torch, which takes seconds; a Ctrl-C in that time would
end in a traceback, since the package's own error handling (``attnlab.cli``) is not
loaded yet. This module catches it and prints one line, as every command does.

Example:
    >>> import attnlab_launch
    >>> callable(attnlab_launch.main)
    True
"""

from __future__ import annotations

import sys


def main() -> int:
    """Run ``attnlab`` with ``sys.argv``; exit status 130 for a Ctrl-C while starting."""
    try:
        from attnlab.cli import main as cli_main
    except KeyboardInterrupt:
        print("attnlab: interrupted (SIGINT) while starting; nothing was done", file=sys.stderr)
        return 130
    except ImportError as e:  # a torch older than attnlab needs, or a missing package
        print(f"attnlab: error: {e}", file=sys.stderr)
        return 1
    return cli_main()

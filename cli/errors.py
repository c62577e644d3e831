"""Exit codes, and the one error type commands raise to stop with a clean message."""

from __future__ import annotations

import os

from graph.settings import redact

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran, but some sessions (or policies) failed
EXIT_USAGE = 2  # bad arguments, settings, files or ports: nothing was run
EXIT_INTERRUPTED = 130  # Ctrl-C: manifests written, resume printed


class CliError(Exception):
    """A problem the user can fix; printed as one message naming the thing, no traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def clean(text: str) -> str:
    """`text` with URL credentials and the API key (`TANDEM_API_KEY`) shown as `***`."""
    keys = [value for name, value in os.environ.items() if name.upper() == "TANDEM_API_KEY"]
    return redact(text, keys)

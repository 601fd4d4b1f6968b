"""The bundle's code; the configs import it as `scripts`.

On the bundle command line (`python -m monai.bundle ...`) a failure inside a config expression reaches the user
wrapped in MONAI's "Failed to evaluate ConfigExpression"; the hook below ends the traceback with the root cause, so
that the last line says what is wrong (a file, a setting) rather than which expression failed.
"""

import os
import sys


def _cause_last(kind, error, traceback, previous=sys.excepthook) -> None:
    previous(kind, error, traceback)
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    if root is not error:
        print(f"\nCause: {type(root).__name__}: {root}", file=sys.stderr)


if sys.argv and sys.argv[0].endswith(os.path.join("monai", "bundle", "__main__.py")):
    sys.excepthook = _cause_last

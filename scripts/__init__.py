"""The bundle's code; the configs import it as `scripts`.

On the bundle command line (`python -m monai.bundle ...`) a failure inside a config expression reaches the user
wrapped in MONAI's "Failed to evaluate ConfigExpression"; the hook below ends the traceback with the cause, so
that the last line says what is wrong (a file, a setting) rather than which expression failed.
"""

import os
import sys


def cause_chain(error: BaseException) -> list[BaseException]:
    """`error` and its causes, outermost first; a cause seen twice (a cyclic chain) ends the walk."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__
    return chain


def _cause_last(kind, error, traceback, previous=sys.excepthook) -> None:
    """The bundle's own error where there is one (it names the file or setting), else the innermost cause; Ctrl-C
    gets the way on instead of a traceback."""
    chain = cause_chain(error)
    if any(isinstance(e, KeyboardInterrupt) for e in chain):
        print("\nInterrupted. The same command again goes on from there: a training resumes after its last completed "
              "step (epoch checkpoints included), an inference (not an evaluation) skips the maps already written.",
              file=sys.stderr)  # fmt: skip
        return
    previous(kind, error, traceback)
    ours = [e for e in chain if type(e).__module__.split(".")[0] == __name__]
    cause = ours[0] if ours else chain[-1]
    if cause is not error:
        print(f"\nCause: {type(cause).__name__}: {cause}", file=sys.stderr)


if sys.argv and sys.argv[0].endswith(os.path.join("monai", "bundle", "__main__.py")):
    sys.excepthook = _cause_last

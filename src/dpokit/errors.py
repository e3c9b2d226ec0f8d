"""The one exception type for errors a user can cause.

The command line prints a ``DpokitError`` as a single line on stderr and exits with status 2;
programming errors stay ordinary tracebacks.
"""


class DpokitError(ValueError):
    """Bad input or a refused request (budget exceeded, malformed file, impossible value).

    The message is written for the user: it names the file, row and field, or the argument,
    and says what would be accepted.
    """


class BudgetExceededError(DpokitError):
    """An exact computation would exceed its budget (e.g. enumerating V^T sequences)."""


def check_beta(beta: float) -> float:
    """``beta`` as a float after checking β > 0 and finite (docs/theory.md §2 needs β > 0)."""
    value = float(beta)
    if not value > 0 or value == float("inf"):
        raise DpokitError(f"beta must be a finite number > 0, got {beta!r}")
    return value

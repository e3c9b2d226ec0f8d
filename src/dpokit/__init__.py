"""dpokit: KL-regularised preference optimisation — the exact optimal policy and DPO.

The exact theory lives in :mod:`dpokit.theory` (pure tensor functions, docs/theory.md's notation).
"""

from dpokit.errors import DpokitError

__all__ = ["DpokitError", "__version__"]
__version__ = "0.1.0"

"""The ``purekd demo`` application (needs the ``demo`` extra: scikit-learn, matplotlib)."""

from ._run import Result, run, table

__all__ = ["Result", "run", "table"]

"""``vfm-adapters adapt CONFIG``: a DACS or CLOUDS-style self-training run (see docs/dacs.md)."""

from vfm_adapters.adaptation.__main__ import HELP, NAME, add_arguments, run

__all__ = ["HELP", "NAME", "add_arguments", "run"]

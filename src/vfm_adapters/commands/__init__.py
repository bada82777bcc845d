"""Sub-commands of the ``vfm-adapters`` command line, one module each.

A command module defines ``NAME`` (the sub-command), ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; :mod:`vfm_adapters.cli` finds every
module in this package, so adding a command is adding a file.
"""

"""The ``vfm-adapters`` command line: one sub-command per module in :mod:`.commands`.

Building the parser imports only the small command modules (each imports torch and the
library inside its ``run``), so ``vfm-adapters --help`` answers at once. Errors the library
raises on purpose (bad config, bad input, missing files) are printed as one line with exit
status 2; ``--traceback`` shows the full trace instead.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

from . import __version__, commands


def command_modules() -> dict[str, ModuleType]:
    modules = {}
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        modules[module.NAME] = module
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfm-adapters",
        description="Parameter-efficient fine-tuning of vision foundation models for domain-generalised segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"vfm-adapters {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in command_modules().items():
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


#: Library errors that are not ``ValueError``/``FileNotFoundError`` subclasses, by module.
#: Looked up in ``sys.modules`` so that building the error list imports nothing.
_LIBRARY_ERRORS = {
    "vfm_adapters.hosts.base": ("UnsupportedModelError",),
    "vfm_adapters._io": ("DiskWriteError",),
    "vfm_adapters.seg._png": ("ImageReadError",),
    "vfm_adapters.seg.training": ("TrainingDivergedError",),
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe a user's mistake (or the machine's state) and print as one line.

    Most library errors subclass ``ValueError`` or ``FileNotFoundError`` (``ConfigError``,
    ``AdapterError``, ``DatasetLayoutError``, ``LabelRangeError``, ``RunManifestError``);
    the others are listed in ``_LIBRARY_ERRORS``. A ``TypeError``, ``KeyError`` or any
    other exception from a bug still shows its traceback.
    """
    errors: list[type[BaseException]] = [ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                                         IsADirectoryError, PermissionError]
    for module_name, names in _LIBRARY_ERRORS.items():
        module = sys.modules.get(module_name)  # imported only if the command got that far
        errors.extend(getattr(module, name) for name in names if module is not None)
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vfm-adapters``.

    Example:
        >>> main(["report", "--model", "vit_small_patch14_dinov2", "--depth", "2",
        ...       "--embed-dim", "64", "--method", "rein"])  # doctest: +ELLIPSIS
        part ...
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except Exception as error:  # noqa: BLE001 - filtered just below
        if args.traceback or not isinstance(error, _user_errors()):
            raise
        message = str(error).strip() or type(error).__name__
        message = " ".join(message.split())  # one line, whatever the library's message looked like
        print(f"vfm-adapters {args.command}: error: {type(error).__name__}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

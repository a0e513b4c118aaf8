"""Command line: `python -m attnopt inspect path/to/file.py:factory [--json]`.

`factory()` must return `(model, args, kwargs)`; the model is run once on them and every
attention site found is printed as a table (or as JSON with --json).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from . import inspect
from .backend import AttnoptError


def _load_factory(spec: str):
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise AttnoptError(f"expected path/to/file.py:factory, got {spec!r}.")
    file = Path(path)
    if not file.is_file():
        raise AttnoptError(f"no such file: {file}.")
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[file.stem] = module
    module_spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise AttnoptError(f"{file} has no function {name!r}.")
    return getattr(module, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnopt", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect_parser = commands.add_parser("inspect", help="list every attention site of a model")
    inspect_parser.add_argument("target", help="path/to/file.py:factory, factory() -> (model, args, kwargs)")
    inspect_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    options = parser.parse_args(argv)
    try:
        produced = _load_factory(options.target)()
        if not (isinstance(produced, tuple) and len(produced) == 3):
            raise AttnoptError("the factory must return (model, args, kwargs).")
        model, args, kwargs = produced
        report = inspect(model, tuple(args), kwargs)
    except AttnoptError as error:
        print(f"attnopt: {error}", file=sys.stderr)
        return 2
    print(report.to_json() if options.json else report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

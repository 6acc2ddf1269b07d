"""python -m benchmarks [BENCHMARK] [options]: each benchmark is a subcommand (default: write)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

from benchmarks import console, effects, http, projections, write_path, writers


@dataclass(frozen=True)
class Benchmark:
    """A subcommand: its help line, how it reads its options and how it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]

    @classmethod
    def from_module(cls, module: ModuleType) -> Benchmark:
        return cls(
            help=(module.__doc__ or "").strip().splitlines()[0],
            add_arguments=module.add_arguments,
            run=module.run,
        )


# New benchmarks (projections, delivery, http) register here.
BENCHMARKS: dict[str, Benchmark] = {
    "write": Benchmark.from_module(write_path),
    "projections": Benchmark.from_module(projections),
    "effects": Benchmark.from_module(effects),
    "http": Benchmark.from_module(http),
    "writers": Benchmark.from_module(writers),
    "console": Benchmark.from_module(console),
}
DEFAULT = "write"


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=f"orderledger benchmarks (without a name, runs {DEFAULT!r}).",
    )
    commands = root.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, benchmark in BENCHMARKS.items():
        sub = commands.add_parser(name, help=benchmark.help, description=benchmark.help)
        benchmark.add_arguments(sub)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # Options without a benchmark name belong to the default one.
    if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
        args.insert(0, DEFAULT)
    namespace = parser().parse_args(args)
    return BENCHMARKS[namespace.benchmark].run(namespace)


if __name__ == "__main__":
    sys.exit(main())

"""`resstream bench ...`: benchmarks that print tables of ratios measured side by side in one
run. Each benchmark is a module of this package exposing `register(subparsers)`."""
from __future__ import annotations

import importlib

BENCHMARKS = ("attention", "operators", "decode", "pipeline", "train")


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark and print a table of ratios")
    benches = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name in BENCHMARKS:
        try:
            module = importlib.import_module(f"resstream.bench.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"resstream.bench.{name}":
                raise
            continue  # benchmark not written yet
        module.register(benches)

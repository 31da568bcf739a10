"""``pytest benchmarks/ --benchmark``: without the flag every benchmark is skipped, so a plain ``pytest`` stays
quick. On a CPU machine the suite runs its small quick mode (the Triton interpreter is no speed reference:
the point is that the suite runs); on a GPU it runs the full registry and writes the tables to
``benchmarks/results/`` (JSON + Markdown, with device, versions and commit)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from bench_utils import ResultTable  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False, help="run the rpo_fast benchmarks")


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a benchmark (needs --benchmark)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmarks run with --benchmark")
    for item in items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def results(request):
    """Rows collected by the benchmarks of the session, written out at its end."""
    tables: dict[str, ResultTable] = {}
    yield tables
    for table in tables.values():
        paths = table.write()
        if paths:
            print("\n" + "\n".join(f"[bench] wrote {p}" for p in paths))

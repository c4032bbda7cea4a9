"""Dependencies run one way: client -> shared, service -> shared, and only the command on top
imports both halves. Read from the sources, so a lazy import inside a function counts too."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import-graph.py")
assert spec is not None and spec.loader is not None
import_graph = importlib.util.module_from_spec(spec)
sys.modules["import_graph"] = import_graph
spec.loader.exec_module(import_graph)

ALLOWED = {
    "prefill_bootstrap": set(),
    "prefill_bootstrap.shared": set(),
    "prefill_bootstrap.client": {"prefill_bootstrap", "prefill_bootstrap.shared"},
    "prefill_bootstrap.service": {"prefill_bootstrap", "prefill_bootstrap.shared"},
    "prefill_bootstrap.cli": {
        "prefill_bootstrap",
        "prefill_bootstrap.client",
        "prefill_bootstrap.service",
        "prefill_bootstrap.shared",
    },
}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    graph = import_graph.package_graph()
    assert graph[layer] <= ALLOWED[layer], graph[layer] - ALLOWED[layer]


def test_every_layer_is_known() -> None:
    assert set(import_graph.package_graph()) == set(ALLOWED)


def test_the_graph_sees_lazy_imports_inside_functions() -> None:
    command = import_graph.module_graph()["prefill_bootstrap.service.cli"]
    assert "prefill_bootstrap.service.server" in command  # imported only when serve runs

"""Every module logs under its own name, below ``prefill_bootstrap``, and the server's logging
set-up catches them all, without writing the logging module's private state."""

from __future__ import annotations

import ast
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefill_bootstrap.service.logs import configure_logging

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "client", "shared", "prefill_bootstrap")
NAMED_ON_PURPOSE = {
    ("service/logs.py", "'uvicorn.access'"),  # uvicorn's access log gets our redaction filter
}


def logger_names() -> Iterator[tuple[str, str]]:
    """(module, the source of each ``getLogger`` argument) across the package."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "getLogger"
                    and node.args
                ):
                    yield str(path.relative_to(ROOT)), ast.unparse(node.args[0])


def test_every_module_logs_under_its_own_name() -> None:
    names = set(logger_names())
    assert ("service/group.py", "__name__") in names
    by_hand = {name for name in names if name[1] not in ("__name__", "__package__")}
    assert by_hand == NAMED_ON_PURPOSE


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    flags = logging.logThreads, logging.logProcesses, logging.logMultiprocessing
    yield
    root.handlers[:], root.level = handlers, level
    logging.logThreads, logging.logProcesses, logging.logMultiprocessing = flags


@pytest.mark.usefixtures("restored_logging")
def test_the_server_logging_shows_every_module(capsys: pytest.CaptureFixture[str]) -> None:
    caller_lookup = logging._srcfile  # type: ignore[attr-defined]
    configure_logging("info", "json")
    for module in ("group", "store", "hot_protocol", "server"):
        logging.getLogger(f"prefill_bootstrap.service.{module}").info("from %s", module)
    logging.getLogger("prefill_bootstrap.service.store").debug("below the level")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["logger"], line["message"]) for line in lines] == [
        (f"prefill_bootstrap.service.{module}", f"from {module}")
        for module in ("group", "store", "hot_protocol", "server")
    ]
    assert logging._srcfile == caller_lookup, "a private global of logging, left alone"  # type: ignore[attr-defined]

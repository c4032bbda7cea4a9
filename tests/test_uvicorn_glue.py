"""The server's hold on uvicorn's internals: every touch point is present in the installed
release, pyproject.toml admits only the releases tested, and a release that lacks one is refused
at start-up with the touch point named instead of failing a request later."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from types import FrameType

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from prefill_bootstrap.cli import main
from prefill_bootstrap.service import server
from prefill_bootstrap.service.uvicorn_glue import (
    TESTED_UVICORN,
    TOUCH_POINTS,
    PendingCycle,
    UvicornIncompatible,
    check_uvicorn,
)
from prefill_bootstrap.shared.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_uvicorn_has_every_touch_point() -> None:
    missing = [point.name for point in TOUCH_POINTS if not point.present()]
    assert missing == []
    check_uvicorn()


def test_pyproject_admits_only_the_tested_uvicorn_releases() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.findall(r'"uvicorn([^"]*)"', pyproject) == [TESTED_UVICORN]
    upper = re.search(r"<(\d+)\.(\d+)", TESTED_UVICORN)
    assert upper is not None
    installed = tuple(int(part) for part in uvicorn.__version__.split(".")[:2])
    assert installed < (int(upper[1]), int(upper[2])), "raise the bound once tested with it"


def test_a_missing_method_is_named_with_the_tested_releases(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(HttpToolsProtocol, "on_response_complete")
    with pytest.raises(UvicornIncompatible) as refused:
        check_uvicorn()
    message = str(refused.value)
    assert "HttpToolsProtocol's connection_made" in message
    assert "on_response_complete" in message
    assert f"uvicorn {uvicorn.__version__} lacks" in message
    assert TESTED_UVICORN in message


def test_an_attribute_uvicorn_no_longer_sets_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def renamed(self: ServerState) -> None:
        self.headers_for_every_response = []  # type: ignore[attr-defined]

    monkeypatch.setattr(ServerState, "__init__", renamed)
    with pytest.raises(
        UvicornIncompatible, match=r"HttpToolsProtocol\.server_state\.default_headers"
    ):
        check_uvicorn()


def test_a_keyword_uvicorn_no_longer_takes_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    async def startup(self: uvicorn.Server, listeners: list[object] | None = None) -> None: ...

    monkeypatch.setattr(uvicorn.Server, "startup", startup)
    with pytest.raises(UvicornIncompatible, match=r"uvicorn\.Server\.startup\(sockets=\)"):
        check_uvicorn()


def test_a_signal_handler_uvicorn_calls_differently_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def handle_exit(self: uvicorn.Server, frame: FrameType | None) -> None: ...

    monkeypatch.setattr(uvicorn.Server, "handle_exit", handle_exit)
    with pytest.raises(UvicornIncompatible, match=r"uvicorn\.Server\.handle_exit\(sig, frame\)"):
        check_uvicorn()


def test_serve_refuses_an_incompatible_uvicorn_before_binding_anything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delattr(uvicorn.Server, "handle_exit")
    monkeypatch.setattr(server, "configure_logging", lambda *_: None)  # this process's logging
    assert main(["serve", "--host", "127.0.0.1", "--port", "0", "--state-dir", ""]) == 1
    error = capsys.readouterr().err
    assert error.startswith("prefill-bootstrap serve: the installed uvicorn")
    assert "uvicorn.Server.handle_exit(sig, frame)" in error
    assert TESTED_UVICORN in error


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_a_moved_uvicorn_module_is_named_when_the_server_is_imported() -> None:
    """uvicorn's protocol module is subclassed as the glue module is imported: if it is gone,
    that import says so (a missing httptools still reads as a missing [server] extra)."""
    probe = """
import sys, types
import uvicorn.protocols.http
name = "uvicorn.protocols.http.httptools_impl"
sys.modules[name] = types.ModuleType(name)  # a release without the two names
from prefill_bootstrap.shared.errors import ConfigurationError
try:
    import prefill_bootstrap.service.uvicorn_glue
except ConfigurationError as exc:
    print(exc)
"""
    moved = run_python(probe)
    assert "lacks uvicorn.protocols.http.httptools_impl (HttpToolsProtocol, STATUS_LINE)" in (
        moved.stdout
    ), moved.stderr
    assert TESTED_UVICORN in moved.stdout

    no_httptools = run_python(
        "import sys; sys.modules['httptools'] = None\n"
        "try:\n    import prefill_bootstrap.service.uvicorn_glue\n"
        "except ImportError as exc:\n    print(type(exc).__name__, exc.name)\n"
    )
    assert no_httptools.stdout.split() == ["ModuleNotFoundError", "httptools"], no_httptools.stderr


def test_a_pending_cycle_starts_as_uvicorn_expects_of_a_cycle_being_answered() -> None:
    pending = PendingCycle()
    assert (pending.response_complete, pending.disconnected, pending.keep_alive) == (
        False,
        False,
        True,
    )
    pending.message_event.set()  # what uvicorn does to it when the connection is lost
    assert issubclass(UvicornIncompatible, ConfigurationError)


def test_only_the_glue_module_imports_uvicorn() -> None:
    importers = set()
    for path in sorted(ROOT.glob("*/*.py")):
        if path.parts[-2] not in ("service", "client", "shared", "prefill_bootstrap"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = (
                [alias.name for alias in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom)
                else []
            )  # fmt: skip
            if any(module.split(".")[0] == "uvicorn" for module in modules):
                importers.add(str(path.relative_to(ROOT)))
    assert importers == {"service/uvicorn_glue.py"}

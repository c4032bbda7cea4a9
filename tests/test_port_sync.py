"""``sync_bootstrap_port`` without a world: the single-node path and the errors that never guess.

The multi-process broadcast itself is in ``test_port_sync_distributed.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from prefill_bootstrap.client.port_sync import sync_bootstrap_port
from prefill_bootstrap.shared.errors import ConfigurationError, DistributedNotInitialized


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_single_node_without_dist_init_addr_keeps_its_local_port() -> None:
    assert sync_bootstrap_port(41234, dist_init_addr=None, nnodes=2) == 41234


def test_one_node_keeps_its_local_port_even_with_a_dist_init_addr() -> None:
    assert sync_bootstrap_port(41234, dist_init_addr="10.0.0.1:5000", nnodes=1) == 41234


def test_the_single_node_path_never_imports_torch() -> None:
    result = run_python(
        """
        import sys
        from prefill_bootstrap.client.port_sync import sync_bootstrap_port
        port = sync_bootstrap_port(41234, dist_init_addr=None, nnodes=1)
        print(port, "torch" in sys.modules)
        """
    )
    assert result.stdout.split() == ["41234", "False"], result.stderr


def test_multi_node_without_an_initialised_process_group_raises_and_never_guesses() -> None:
    pytest.importorskip("torch")
    with pytest.raises(DistributedNotInitialized) as caught:
        sync_bootstrap_port(41234, dist_init_addr="10.0.0.1:5000", nnodes=2)
    message = str(caught.value)
    assert "nnodes=2, dist_init_addr=10.0.0.1:5000" in message
    assert "torch.distributed is not initialised" in message
    assert "init_process_group()" in message


def test_multi_node_without_torch_installed_names_the_extra_to_install() -> None:
    result = run_python(
        """
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        from prefill_bootstrap.shared.errors import ConfigurationError
        from prefill_bootstrap.client.port_sync import sync_bootstrap_port
        try:
            sync_bootstrap_port(41234, dist_init_addr="10.0.0.1:5000", nnodes=2)
        except ConfigurationError as exc:
            print(exc)
        """
    )
    assert "pip install 'prefill-bootstrap[torch]'" in result.stdout, result.stderr


def test_importing_the_client_never_imports_torch_or_the_server() -> None:
    result = run_python(
        """
        import json, sys
        import prefill_bootstrap.client
        from prefill_bootstrap.client import *  # noqa: F403 - every public name, loaded
        import prefill_bootstrap.cli
        import prefill_bootstrap.client.commands
        heavy = ("torch", "fastapi", "uvicorn", "starlette", "numpy")
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
        """
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_every_public_name_of_the_client_package_resolves() -> None:
    import prefill_bootstrap.client as client

    for name in client.__all__:
        assert getattr(client, name) is not None, name
    with pytest.raises(AttributeError):
        _ = client.no_such_name  # type: ignore[attr-defined]


def test_configuration_errors_are_bootstrap_errors_the_cli_reports() -> None:
    from prefill_bootstrap.shared.errors import BootstrapError

    assert issubclass(DistributedNotInitialized, ConfigurationError)
    assert issubclass(ConfigurationError, BootstrapError)

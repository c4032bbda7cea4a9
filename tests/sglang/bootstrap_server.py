"""SGLang's own bootstrap server: the installed release's `CommonKVBootstrapServer`, until SIGTERM.

Run by an SGLang test env's python:

    .cache/sglang-envs/0.5.23/bin/python tests/sglang/bootstrap_server.py HOST PORT

The server starts its own (daemon) thread in its constructor; this process waits for SIGTERM or
SIGINT. On the way out it prints one JSON line on stdout, the cells it holds, since SGLang's
server has no route that lists them:

    {"cells": [{"dp": .., "cp": .., "tp": .., "pp": .., "rank_ip": .., "rank_port": ..}, ...]}

SGLang's logging goes to stderr at INFO. Poll GET /health to know it is serving (a port clash
kills SGLang's server thread without ending the process).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from typing import Any

import torchvision_schemas

torchvision_schemas.declare()


def main(argv: list[str]) -> int:
    result_fd = os.dup(1)
    os.dup2(2, 1)  # stdout carries the final JSON line only
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
        force=True,
    )
    host, port = argv[1], int(argv[2])
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    from sglang.srt.disaggregation.common.conn import CommonKVBootstrapServer

    server = CommonKVBootstrapServer(host, port)
    logging.getLogger("sglang_harness.bootstrap_server").info(
        "SGLang's bootstrap server runs on %s:%d until SIGTERM.", host, port
    )
    stop.wait()
    with os.fdopen(result_fd, "w") as out:
        out.write(json.dumps({"cells": _cells(server)}) + "\n")
    return 0


def _cells(server: Any) -> list[dict[str, Any]]:
    """The registered cells: prefill_port_table is dp -> cp -> tp -> pp -> rank info."""
    cells = []
    for dp, by_cp in sorted(server.prefill_port_table.items()):
        for cp, by_tp in sorted(by_cp.items()):
            for tp, by_pp in sorted(by_tp.items()):
                for pp, info in sorted(by_pp.items()):
                    cells.append(
                        {
                            "dp": dp,
                            "cp": cp,
                            "tp": tp,
                            "pp": pp,
                            "rank_ip": info.rank_ip,
                            "rank_port": info.rank_port,
                        }
                    )
    return cells


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""A decode-style reader, run inside a test host: polls ``GET /route`` for the server info the way
an SGLang decode worker does until the prefill group is complete, then looks up every cell.
Prints one JSON line: how many 503s it saw, the server info, and every cell's address."""

from __future__ import annotations

import json
import sys
import time

import httpx

INFO = {"prefill_dp_rank": -1, "prefill_cp_rank": -1, "target_tp_rank": -1, "target_pp_rank": -1}


def main() -> None:
    base, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
    statuses: dict[str, int] = {}
    info = None
    with httpx.Client(base_url=base, timeout=2) as client:
        while time.monotonic() < deadline:
            try:
                response = client.get("/route", params=INFO)
            except httpx.HTTPError:
                statuses["unreachable"] = statuses.get("unreachable", 0) + 1
                time.sleep(0.05)
                continue
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
            if response.status_code == 200:
                info = response.json()
                break
            time.sleep(0.05)
        cells = {}
        if info is not None:
            for dp in range(info["dp_size"]):
                for cp in range(info["attn_cp_size"]):
                    for tp in range(info["attn_tp_size"]):
                        for pp in range(info["pp_size"]):
                            params = {"prefill_dp_rank": dp, "prefill_cp_rank": cp,
                                      "target_tp_rank": tp, "target_pp_rank": pp}  # fmt: skip
                            answer = client.get("/route", params=params).json()
                            cells[f"{dp},{cp},{tp},{pp}"] = answer
    print(json.dumps({"statuses": statuses, "info": info, "cells": cells}), flush=True)


if __name__ == "__main__":
    main()

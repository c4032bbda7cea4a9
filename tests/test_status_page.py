"""The status page in a real headless Chromium: missing cells shown as missing, the grid updates
in place when the table completes (no reload) because it watches the event stream ("live"), the
recent events are listed, and a screenshot is kept as an artifact."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, sglang_registration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("PREFILL_BOOTSTRAP_ARTIFACTS", "test-artifacts"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run",
]  # fmt: skip

if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
    pytest.skip("chromium is not installed (make dev installs it)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")

# A 2 x 1 x 4 x 2 group (dp x cp x tp x pp): 16 cells.
SIZES = {"attn_dp_size": 2, "attn_tp_size": 4, "pp_size": 2}


def register(url: str, dp: int, tp: int, pp: int, port: int | None = None) -> None:
    body = sglang_registration(
        **SIZES, attn_dp_rank=dp, attn_tp_rank=tp, pp_rank=pp,
        rank_ip=f"10.0.{dp}.{tp}", rank_port=port or 41000 + pp,
    )  # fmt: skip
    httpx.put(f"{url}/route", json=body, timeout=10).raise_for_status()


@pytest.mark.timeout(120)
def test_the_page_shows_missing_cells_then_updates_without_reload(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory(durable=False)
    for tp in range(4):
        for pp in range(2):
            register(server.url, 0, tp, pp)
    register(server.url, 1, 0, 0)
    register(server.url, 1, 1, 1)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{server.url}/", wait_until="load")
        page.wait_for_selector("#status[data-state='incomplete']", timeout=20_000)
        page.wait_for_selector("#mode[data-mode='live']", timeout=20_000)
        assert page.locator("#grid .cell.missing").count() == 6
        assert page.locator("#grid .cell.ok").count() == 10
        assert page.locator("#counts").inner_text().startswith("10 / 16")
        missing = page.locator("[data-cell='1,0,2,1']")
        assert "missing" in missing.get_attribute("class")
        assert page.locator("[data-cell='0,0,3,1']").inner_text().endswith("10.0.0.3:41001")
        page.screenshot(path=str(ARTIFACTS / "status-page-partial.png"), full_page=True)

        page.evaluate("window.__sameDocument = true")
        for dp, tp, pp in [(1, 0, 1), (1, 1, 0), (1, 2, 0), (1, 2, 1), (1, 3, 0), (1, 3, 1)]:
            register(server.url, dp, tp, pp)
        page.wait_for_selector("#status[data-state='ready']", timeout=20_000)
        assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
        assert page.locator("#grid .cell.missing").count() == 0
        assert page.locator("#grid .cell.ok").count() == 16
        page.wait_for_selector("#event-list li.complete", timeout=20_000)
        assert page.locator("#event-list li").first.locator(".kind").inner_text() == "complete"
        assert page.locator("#event-list li.registered").count() == 6

        register(server.url, 1, 3, 1, port=42001)  # the rank restarted on another port
        page.wait_for_selector("#event-list li.moved", timeout=20_000)
        moved = page.locator("#event-list li.moved")
        assert moved.locator(".cell").inner_text() == "(dp=1, cp=0, tp=3, pp=1)"
        assert moved.locator(".addresses").inner_text() == "10.0.1.3:41001 -> 10.0.1.3:42001"
        assert moved.locator(".version").inner_text() == "v2"
        page.wait_for_selector("[data-cell='1,0,3,1'].warn", timeout=20_000)
        assert page.locator("#mode").inner_text() == "live"
        page.screenshot(path=str(ARTIFACTS / "status-page-complete.png"), full_page=True)
        browser.close()


@pytest.mark.timeout(60)
def test_the_page_and_its_assets_are_served_from_the_package(server: ServerProcess) -> None:
    root = httpx.get(f"{server.url}/", follow_redirects=True)
    assert root.status_code == 200
    assert root.headers["content-type"].startswith("text/html")
    assert "/ui/app.js" in root.text
    for asset in ("/ui/app.js", "/ui/style.css"):
        response = httpx.get(f"{server.url}{asset}")
        assert response.status_code == 200 and response.content

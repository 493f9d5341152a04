"""The dashboard over HTTPS in Debian's chromium (issue 11): what a first visit shows with
the node's self-signed certificate, and the whole dashboard working once it is accepted
(Playwright's ignore_https_errors stands for the operator's "proceed"/installed CA)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, DaemonEnv, kill_vmms

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
UI_TIMEOUT_MS = 10_000
INTEL_CPU = "Intel(R) Xeon(R) Silver 4309Y CPU @ 2.80GHz"

if not CHROMIUM.exists():
    pytest.skip(
        "chromium not found at /usr/bin/chromium: install the Debian package chromium "
        "(make sysdeps)",
        allow_module_level=True,
    )
try:
    from playwright.sync_api import Browser, Error, expect, sync_playwright
except ImportError:
    pytest.skip("playwright is not installed: pip install -e '.[dev]'", allow_module_level=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Daemon]:
    env = DaemonEnv(tmp_path)
    env.extra_env["SMECHVISORD_WEB_DIR"] = str(REPO / "smechvisord" / "web")
    d = Daemon(env)
    yield d
    d.stop()
    kill_vmms(env.run_dir)
    env.cleanup()


def test_first_visit_shows_the_certificate_warning(browser: Browser, node: Daemon) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        with pytest.raises(Error, match="ERR_CERT_AUTHORITY_INVALID"):
            page.goto(node.https_url + "/", timeout=UI_TIMEOUT_MS)
    finally:
        context.close()


def test_dashboard_works_over_https(browser: Browser, node: Daemon) -> None:
    context = browser.new_context(ignore_https_errors=True)
    errors: list[str] = []
    plain: list[str] = []
    try:
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("request", lambda r: plain.append(r.url) if r.url.startswith("http:") else None)
        page.goto(f"{node.https_url}/#token={node.token}")
        expect(page.locator("#view-overview")).to_be_visible()
        expect(page.locator("#ov-cpu-model")).to_have_text(INTEL_CPU)
        expect(page.locator("#status-dot")).to_have_attribute("data-state", "ok")
        assert page.evaluate("location.protocol") == "https:"
        assert page.evaluate("window.isSecureContext") is True
        page.click("#nav-hw")
        expect(page.locator("#view-hw")).to_be_visible()
    finally:
        context.close()
    assert not errors, errors
    assert not plain, f"requests left TLS: {plain}"
    served = [line for line in node.lines if "smechvisord.access: 127.0.0.1 GET /api/node" in line]
    assert served and all(" 200 " in line for line in served)

"""The dashboard in a real browser (issue 6): Playwright for Python driving Debian's chromium.

Playwright never downloads a browser here: it launches /usr/bin/chromium (apt package
`chromium`, installed by scripts/install-sysdeps). Each test starts the real smechvisord
against a fixture sysroot, the cloud-hypervisor stand-in and the recording stand-ins for
modprobe and reboot, serving the repo's smechvisord/web.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon, DaemonEnv, kill_vmms

REPO = Path(__file__).resolve().parents[2]
WEB_DIR = REPO / "smechvisord" / "web"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OS_INDICATIONS = "sys/firmware/efi/efivars/OsIndications-8be4df61-93ca-11d2-aa0d-00e098032b8c"
INTEL_CPU = "Intel(R) Xeon(R) Silver 4309Y CPU @ 2.80GHz"
# Every UI wait is bounded; the stand-in VMM boots in well under a second.
UI_TIMEOUT_MS = 10_000

if not CHROMIUM.exists():
    pytest.skip(
        "chromium not found at /usr/bin/chromium: install the Debian package chromium "
        "(make sysdeps)",
        allow_module_level=True,
    )
try:
    from playwright.sync_api import Browser, Page, ViewportSize, expect, sync_playwright
except ImportError:
    pytest.skip(
        "playwright is not installed: pip install -e '.[dev]'",
        allow_module_level=True,
    )

DESKTOP: ViewportSize = {"width": 1366, "height": 768}
PHONE: ViewportSize = {"width": 390, "height": 844}


# ---- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Never let playwright look for (or fetch) its own browser build.
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def artifacts(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """tmp_path/artifacts, or DASHBOARD_ARTIFACT_DIR/<test name> to keep them (CI upload)."""
    keep = os.environ.get("DASHBOARD_ARTIFACT_DIR")
    out = Path(keep) / request.node.name if keep else tmp_path / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    return out


class Node:
    """One fixture node: its files, its daemon, restartable on the same port."""

    def __init__(self, root: Path, kind: str) -> None:
        self.env = DaemonEnv(root, kind=kind)
        self.env.extra_env["SMECHVISORD_WEB_DIR"] = str(WEB_DIR)
        self.daemon = Daemon(self.env)

    def restart_on_same_port(self) -> None:
        port = self.daemon.port
        self.daemon.stop()
        self.env.extra_env["SMECHVISORD_BIND"] = f"127.0.0.1:{port}"
        self.daemon = Daemon(self.env)

    def managed_vms(self) -> list[dict[str, Any]]:
        reply = self.daemon.get("/api/vms")
        assert reply.status == 200
        # Unmanaged VMMs left by other runs on this machine show up too; ours are managed.
        return [vm for vm in reply.json if vm.get("managed")]

    def os_indications(self) -> bytes:
        return (self.env.sysroot / OS_INDICATIONS).read_bytes()


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[[str], Node]]:
    nodes: list[Node] = []

    def make(kind: str = "intel-ready") -> Node:
        node = Node(tmp_path / f"node{len(nodes)}", kind)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.daemon.stop()
        kill_vmms(node.env.run_dir)
        node.env.cleanup()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=DESKTOP)
    pg = context.new_page()
    pg.set_default_timeout(UI_TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, f"uncaught script errors on the page: {errors}"


def login(page: Page, node: Node, view: str = "overview") -> None:
    """Sign in through the `#token=` fragment the daemon prints, then open `view`."""
    page.goto(f"{node.daemon.url}/#token={node.daemon.token}")
    expect(page.locator("#view-overview")).to_be_visible()
    if view != "overview":
        page.click(f"#nav-{view}")
        expect(page.locator(f"#view-{view}")).to_be_visible()


def shoot(page: Page, artifacts: Path, name: str) -> Path:
    path = artifacts / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def provision(
    page: Page, name: str, cpus: str = "2", memory: str = "512", disk: Path | None = None
) -> None:
    page.click("#nav-provision")
    page.fill("#f-name", name)
    page.fill("#f-cpus", cpus)
    page.fill("#f-memory", memory)
    if disk is not None:
        page.select_option("#f-disk", str(disk))
    page.click("#vm-submit")


# ---- login --------------------------------------------------------------------------


def test_wrong_token_is_refused_and_right_token_shows_the_node(
    page: Page, make_node: Callable[[str], Node], artifacts: Path
) -> None:
    node = make_node("intel-ready")
    page.goto(node.daemon.url + "/")
    expect(page.locator("#view-login")).to_be_visible()
    expect(page.locator("#view-overview")).to_be_hidden()
    shoot(page, artifacts, "login")

    page.fill("#login-token", "not-the-token-" + "x" * 20)
    page.click("#login-submit")
    expect(page.locator("#login-error")).to_contain_text("refused")
    expect(page.locator("#view-login")).to_be_visible()
    expect(page.locator("#view-overview")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('smechvisor.token')") is None

    page.fill("#login-token", node.daemon.token)
    page.press("#login-token", "Enter")
    expect(page.locator("#view-overview")).to_be_visible()
    expect(page.locator("#ov-cpu-model")).to_have_text(INTEL_CPU)
    expect(page.locator("#ov-cpu-cores")).to_have_text("8")
    expect(page.locator("#ov-mem-total")).to_have_text("125.8 GiB")
    expect(page.locator("#node-name")).to_have_text("smech-01")
    expect(page.locator("#ov-kvm")).to_have_text("Available")
    # Kept for the tab's session: a reload stays signed in.
    assert page.evaluate("sessionStorage.getItem('smechvisor.token')") == node.daemon.token
    page.reload()
    expect(page.locator("#ov-cpu-model")).to_have_text(INTEL_CPU)


def test_token_fragment_signs_in_and_leaves_the_address_bar(
    page: Page, make_node: Callable[[str], Node]
) -> None:
    node = make_node("intel-ready")
    login(page, node)
    expect(page.locator("#ov-cpu-cores")).to_have_text("8")
    assert node.daemon.token not in page.url
    # A token that stops working (here: a wrong one in storage) returns to login.
    page.evaluate("sessionStorage.setItem('smechvisor.token', 'wrong-token-0123456789')")
    page.reload()
    expect(page.locator("#view-login")).to_be_visible()
    expect(page.locator("#login-error")).to_contain_text("refused")


# ---- provision, list, actions ---------------------------------------------------------


def test_provision_appears_with_pid_then_shutdown_removes_it(
    page: Page, make_node: Callable[[str], Node], artifacts: Path
) -> None:
    node = make_node("intel-ready")
    login(page, node, "provision")
    expect(page.locator("#f-disk option", has_text="disk.img")).to_have_count(1)
    expect(page.locator("#f-cpus-hint")).to_contain_text("1 to 16")
    expect(page.locator("#f-memory-hint")).to_contain_text("128 to 128768 MiB")
    shoot(page, artifacts, "provision")

    provision(page, "web1")
    expect(page.locator("#view-overview")).to_be_visible()
    row = page.locator("#vm-rows tr[data-vm='web1']")
    expect(row).to_be_visible()
    expect(row.locator(".vm-pid")).to_have_text(re.compile(r"^\d+$"))
    [vm] = [v for v in node.managed_vms() if v["id"] == "web1"]
    assert vm["state"] == "running"
    assert vm["cpus"] == 2
    assert vm["memory_mb"] == 512
    expect(row.locator(".vm-pid")).to_have_text(str(vm["pid"]))

    # Console log view.
    row.get_by_role("button", name="Console web1").click()
    expect(page.locator("#console-panel")).to_be_visible()
    expect(page.locator("#console-out")).to_contain_text("smechguest login")
    shoot(page, artifacts, "overview")

    # Pause and resume, without a dialog.
    row.get_by_role("button", name="Pause web1").click()
    expect(row.locator(".state")).to_have_text("paused")
    row.get_by_role("button", name="Resume web1").click()
    expect(row.locator(".state")).to_have_text("running")

    # Shut down: the dialog's cancel leaves it running; confirm shuts it down.
    row.get_by_role("button", name="Shut down web1").click()
    expect(page.locator("#confirm-dialog")).to_be_visible()
    page.click("#confirm-cancel")
    expect(page.locator("#confirm-dialog")).to_be_hidden()
    time.sleep(0.5)
    assert [v["state"] for v in node.managed_vms()] == ["running"]

    row.get_by_role("button", name="Shut down web1").click()
    expect(page.locator("#confirm-text")).to_contain_text("web1")
    page.click("#confirm-ok")
    expect(page.locator("#vm-rows tr[data-vm='web1']")).to_have_count(0)
    assert [v["state"] for v in node.managed_vms()] == ["stopped"]
    # It is listed apart, as stopped, where it can be deleted (with a confirmation).
    stopped = page.locator("#stopped-rows tr[data-vm='web1']")
    expect(stopped.locator(".state")).to_have_text("stopped")
    stopped.get_by_role("button", name="Delete web1").click()
    page.click("#confirm-ok")
    expect(page.locator("#stopped-panel")).to_be_hidden()
    assert node.managed_vms() == []


def test_bad_input_shows_the_error_at_the_field_and_spawns_nothing(
    page: Page, make_node: Callable[[str], Node], tmp_path: Path, artifacts: Path
) -> None:
    node = make_node("intel-ready")
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"\0" * 4096)
    # A link in the image dir that leads outside it is not offered by the picker.
    (node.env.images / "escape.img").symlink_to(outside)
    login(page, node, "provision")
    expect(page.locator("#f-disk option", has_text="escape.img")).to_have_count(0)

    # 0 vCPUs: refused at the field before anything is sent.
    page.fill("#f-cpus", "0")
    page.click("#vm-submit")
    expect(page.locator("#f-cpus-error")).to_contain_text("1 to 16")
    expect(page.locator("#f-cpus")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#f-disk-error")).to_have_text("")

    # The daemon's own refusal (the client does not know the image dirs' bounds) lands at
    # the disk field: a path outside the image dirs, typed as a custom path.
    page.fill("#f-cpus", "2")
    page.fill("#f-memory", "512")
    page.select_option("#f-disk", "__custom__")
    expect(page.locator("#f-disk-path")).to_be_visible()
    page.fill("#f-disk-path", str(outside))
    page.click("#vm-submit")
    expect(page.locator("#f-disk-error")).to_contain_text("outside the image dirs")
    expect(page.locator("#f-cpus-error")).to_have_text("")
    expect(page.locator("#view-provision")).to_be_visible()
    # The same for a link in an image dir that resolves outside it.
    page.fill("#f-disk-path", str(node.env.images / "escape.img"))
    page.click("#vm-submit")
    expect(page.locator("#f-disk-error")).to_contain_text("outside the image dirs")

    # Memory above the node's RAM, and a name the daemon would refuse, are caught too.
    page.select_option("#f-disk", str(node.env.disk))
    page.fill("#f-memory", "999999")
    page.fill("#f-name", "<img src=x onerror=alert(1)>")
    page.click("#vm-submit")
    expect(page.locator("#f-memory-error")).to_contain_text("128 to 128768")
    expect(page.locator("#f-name-error")).to_contain_text("a-z")
    shoot(page, artifacts, "provision-errors")

    assert node.managed_vms() == []
    assert not any(Path(node.env.run_dir).glob("*.sock"))


# ---- HW settings -------------------------------------------------------------------------


def test_amd_no_iommu_blocks_vfio_with_the_failing_check(
    page: Page, make_node: Callable[[str], Node], artifacts: Path
) -> None:
    node = make_node("amd-no-iommu")
    login(page, node, "hw")
    toggle = page.locator("#vfio-toggle")
    expect(toggle).to_be_disabled()
    expect(page.locator("#vfio-reason")).to_contain_text("IOMMU groups are empty")
    expect(page.locator("#iommu-summary")).to_have_text("NOT READY")
    failing = page.locator("#iommu-checks li[data-ok='no']")
    expect(failing).to_have_count(1)
    expect(failing).to_have_attribute("data-check", "iommu_groups")
    expect(failing.locator(".check-fix")).to_contain_text("Enable VT-d / AMD-Vi")
    expect(page.locator("#iommu-checks li[data-ok='yes']")).to_have_count(2)
    # This firmware cannot boot to setup: the button says why and stays off.
    expect(page.locator("#reboot-btn")).to_be_disabled()
    expect(page.locator("#reboot-reason")).to_contain_text("OsIndicationsSupported")
    expect(page.locator("#pci-rows tr")).to_have_count(7)
    shoot(page, artifacts, "hw-amd-no-iommu")
    assert node.env.recorded() == []


def test_intel_vfio_toggle_runs_modprobe(
    page: Page, make_node: Callable[[str], Node], artifacts: Path
) -> None:
    node = make_node("intel-ready")
    login(page, node, "hw")
    expect(page.locator("#iommu-summary")).to_have_text("READY")
    expect(page.locator("#iommu-checks li[data-ok='yes']")).to_have_count(3)
    expect(page.locator("#pci-rows tr[data-bdf='0000:01:00.0'] td").nth(4)).to_have_text("1")
    shoot(page, artifacts, "hw")
    toggle = page.locator("#vfio-toggle")
    expect(toggle).to_be_enabled()
    expect(toggle).to_have_attribute("aria-checked", "false")
    toggle.click()
    expect(page.locator("#vfio-result")).to_contain_text("Ran: ")
    argvs = [argv[1:] for argv in node.env.recorded()]
    assert argvs == [["vfio-pci"]]


def test_reboot_dialog_cancel_does_nothing_confirm_reboots_once(
    page: Page, make_node: Callable[[str], Node], artifacts: Path
) -> None:
    node = make_node("intel-ready")
    before = node.os_indications()
    assert before == bytes.fromhex("07000000") + (4).to_bytes(8, "little")
    login(page, node, "hw")
    button = page.locator("#reboot-btn")
    expect(button).to_be_enabled()

    button.click()
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#confirm-text")).to_contain_text("its VMs will go down")
    shoot(page, artifacts, "hw-reboot-dialog")
    page.click("#confirm-cancel")
    expect(dialog).to_be_hidden()
    expect(page.locator("#reboot-result")).to_contain_text("Cancelled")
    time.sleep(1)
    assert node.env.recorded() == []
    assert node.os_indications() == before

    # Escape closes the dialog as a cancel, too.
    button.click()
    expect(dialog).to_be_visible()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    assert node.env.recorded() == []

    button.click()
    page.click("#confirm-ok")
    expect(page.locator("#reboot-result")).to_contain_text("Reboot requested")
    assert [argv[1:] for argv in node.env.recorded()] == [["reboot"]]
    assert node.os_indications() == bytes.fromhex("07000000") + (5).to_bytes(8, "little")


# ---- status dot ---------------------------------------------------------------------------


def test_status_dot_turns_red_when_the_daemon_dies_and_green_when_it_returns(
    page: Page, make_node: Callable[[str], Node]
) -> None:
    node = make_node("intel-ready")
    login(page, node)
    dot = page.locator("#status-dot")
    expect(dot).to_have_attribute("data-state", "ok")
    expect(dot).to_have_css("animation-name", "pulse")

    node.daemon.stop()
    started = time.monotonic()
    expect(dot).to_have_attribute("data-state", "down", timeout=10_000)
    print(f"dot red after {time.monotonic() - started:.1f} s")
    expect(page.locator("#status-text")).to_have_text("API offline")

    node.restart_on_same_port()
    expect(dot).to_have_attribute("data-state", "ok", timeout=10_000)
    # Still signed in with the same token: the overview refreshes, no login screen.
    expect(page.locator("#view-login")).to_be_hidden()
    expect(page.locator("#ov-cpu-model")).to_have_text(INTEL_CPU)


def test_polling_pauses_while_the_tab_is_hidden(
    page: Page, make_node: Callable[[str], Node]
) -> None:
    node = make_node("intel-ready")
    login(page, node)
    expect(page.locator("#status-dot")).to_have_attribute("data-state", "ok")
    health: list[float] = []
    page.on(
        "request", lambda r: health.append(time.monotonic()) if "/api/health" in r.url else None
    )
    page.evaluate(
        """() => {
            Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});
            document.dispatchEvent(new Event('visibilitychange'));
        }"""
    )
    time.sleep(6)
    assert health == [], "the dashboard polled /api/health while the tab was hidden"
    page.evaluate(
        """() => {
            Object.defineProperty(document, 'hidden', {configurable: true, get: () => false});
            document.dispatchEvent(new Event('visibilitychange'));
        }"""
    )
    page.wait_for_timeout(3000)
    assert health, "polling did not resume when the tab became visible"


# ---- security ------------------------------------------------------------------------------


def test_pages_carry_csp_and_no_inline_script_or_html_sinks(
    make_node: Callable[[str], Node],
) -> None:
    node = make_node("intel-ready")
    for name in sorted(p.name for p in WEB_DIR.iterdir()):
        reply = node.daemon.get("/" + name, token=None)
        assert reply.status == 200, name
        csp = reply.headers["content-security-policy"]
        assert csp == "default-src 'self'; frame-ancestors 'none'", name
        assert reply.headers["x-content-type-options"] == "nosniff", name
    assert (
        node.daemon.get("/app.js", token=None).headers["content-type"].startswith("text/javascript")
    )

    html = (WEB_DIR / "index.html").read_text()
    scripts = re.findall(r"<script\b([^>]*)>", html)
    assert scripts
    assert all("src=" in attrs for attrs in scripts), "inline <script> in index.html"
    assert "<style" not in html
    assert not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html), "inline event handler in index.html"
    js = (WEB_DIR / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        # The header comment names them to forbid them; the code must not use them.
        code = re.sub(r"/\*.*?\*/", "", js, flags=re.S)
        assert sink not in code, f"app.js uses {sink}"
    for asset in re.findall(r'(?:src|href)="([^"#]+)"', html):
        assert not re.match(r"[a-z]+:|//", asset), (
            f"external asset {asset}: the page must work offline"
        )


def test_csp_blocks_inline_script_and_api_strings_stay_text(
    page: Page, make_node: Callable[[str], Node]
) -> None:
    node = make_node("intel-ready")
    # A PCI driver name is a sysfs symlink's name: make one that is markup.
    payload = "<img src=x onerror=window.__xss=1>"
    device = node.env.sysroot / "sys/bus/pci/devices/0000:00:14.0"
    driver = device / "driver"
    driver.unlink()
    driver.symlink_to(f"../../../bus/pci/drivers/{payload}")
    login(page, node, "hw")
    cell = page.locator("#pci-rows tr[data-bdf='0000:00:14.0'] td").nth(3)
    expect(cell).to_have_text(payload)
    expect(page.locator("#pci-rows img")).to_have_count(0)
    assert page.evaluate("window.__xss") is None

    violations = page.evaluate(
        """() => new Promise((resolve) => {
            const seen = [];
            document.addEventListener(
                'securitypolicyviolation', (e) => seen.push(e.violatedDirective));
            const s = document.createElement('script');
            s.textContent = 'window.__inline = 1';
            document.body.append(s);
            setTimeout(() => resolve(seen), 300);
        })"""
    )
    assert page.evaluate("window.__inline") is None
    assert any(v.startswith("script-src") for v in violations), violations


# ---- screenshots -----------------------------------------------------------------------


def test_screenshots_of_each_view(
    page: Page, browser: Browser, make_node: Callable[[str], Node], artifacts: Path
) -> None:
    node = make_node("intel-ready")
    login(page, node, "provision")
    provision(page, "db-primary", cpus="4", memory="8192")
    expect(page.locator("#vm-rows tr[data-vm='db-primary']")).to_be_visible()
    # A second image: one disk serves one running VM.
    provision(page, "ci-runner", cpus="2", memory="2048", disk=node.env.make_image("ci.img"))
    expect(page.locator("#vm-rows tr[data-vm='ci-runner']")).to_be_visible()
    page.locator("#vm-rows tr[data-vm='ci-runner']").get_by_role(
        "button", name="Pause ci-runner"
    ).click()
    expect(page.locator("#vm-rows tr[data-vm='ci-runner'] .state")).to_have_text("paused")

    paths = [shoot(page, artifacts, "desktop-overview")]
    page.click("#nav-provision")
    paths.append(shoot(page, artifacts, "desktop-provision"))
    page.click("#nav-hw")
    expect(page.locator("#pci-rows tr").first).to_be_visible()
    paths.append(shoot(page, artifacts, "desktop-hw"))

    # Phone-sized: nothing spills sideways out of the page.
    page.set_viewport_size(PHONE)
    for view in ("overview", "provision", "hw"):
        page.click(f"#nav-{view}")
        expect(page.locator(f"#view-{view}")).to_be_visible()
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"{view} overflows a phone viewport by {overflow}px"
        paths.append(shoot(page, artifacts, f"phone-{view}"))
    for path in paths:
        assert path.stat().st_size > 10_000, path


def test_keyboard_reaches_the_views_with_visible_focus(
    page: Page, make_node: Callable[[str], Node]
) -> None:
    node = make_node("intel-ready")
    page.goto(node.daemon.url + "/")
    # The token field has a label, and takes focus.
    expect(page.get_by_label("API token")).to_be_focused()
    page.keyboard.type(node.daemon.token)
    page.keyboard.press("Enter")
    expect(page.locator("#view-overview")).to_be_visible()
    page.focus("#nav-overview")
    page.keyboard.press("Tab")
    expect(page.locator("#nav-provision")).to_be_focused()
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("none", ""), "focused nav link shows no outline"
    page.keyboard.press("Enter")
    expect(page.locator("#view-provision")).to_be_visible()
    for label in ("vCPUs", "Memory (MiB)", "Disk image"):
        expect(page.get_by_label(label, exact=True)).to_be_visible()


# ---- issue 10, #15 ----------------------------------------------------------------------


def test_offline_marks_the_data_stale_and_disables_actions_until_the_api_returns(
    page: Page, make_node: Callable[[str], Node], artifacts: Path
) -> None:
    """When the API went away only the dot changed: the numbers stayed as if live and
    every button stayed clickable."""
    node = make_node("intel-ready")
    login(page, node, "provision")
    provision(page, "web1")
    row = page.locator("#vm-rows tr[data-vm='web1']")
    expect(row.get_by_role("button", name="Pause web1")).to_be_enabled()
    stale = page.locator("#stale")
    expect(stale).to_be_hidden()

    node.daemon.stop()
    expect(page.locator("#status-dot")).to_have_attribute("data-state", "down", timeout=12_000)
    expect(stale).to_be_visible()
    # The time of the last good update, as the page shows times (HH:MM:SS).
    expect(stale).to_contain_text(re.compile(r"last update \d{1,2}:\d{2}:\d{2}"))
    expect(page.locator("main")).to_have_attribute("data-stale", "true")
    for name in ("Shut down web1", "Stop web1", "Pause web1", "Console web1"):
        expect(row.get_by_role("button", name=name)).to_be_disabled()
    expect(page.locator("#ov-new-vm")).to_have_attribute("aria-disabled", "true")
    shoot(page, artifacts, "offline-overview")
    page.click("#nav-provision")
    expect(page.locator("#vm-submit")).to_be_disabled()
    page.click("#nav-hw")
    expect(page.locator("#reboot-btn")).to_be_disabled()
    expect(page.locator("#vfio-toggle")).to_be_disabled()

    node.restart_on_same_port()
    expect(page.locator("#status-dot")).to_have_attribute("data-state", "ok", timeout=12_000)
    expect(stale).to_be_hidden()
    expect(page.locator("#reboot-btn")).to_be_enabled()
    expect(page.locator("#vfio-toggle")).to_be_enabled()
    page.click("#nav-overview")
    expect(row.get_by_role("button", name="Pause web1")).to_be_enabled()
    expect(page.locator("#ov-new-vm")).not_to_have_attribute("aria-disabled", "true")


def test_provision_marks_images_in_use_and_does_not_preselect_them(
    page: Page, make_node: Callable[[str], Node], artifacts: Path
) -> None:
    node = make_node("intel-ready")
    spare = node.env.make_image("spare.img")
    login(page, node, "provision")
    page.select_option("#f-disk", str(node.env.disk))
    page.fill("#f-name", "web1")
    page.fill("#f-memory", "512")
    page.click("#vm-submit")
    expect(page.locator("#vm-rows tr[data-vm='web1']")).to_be_visible()

    page.click("#nav-provision")
    used = page.locator(f"#f-disk option[value='{node.env.disk}']")
    expect(used).to_contain_text("in use by web1")
    expect(page.locator("#f-disk")).to_have_value(str(spare))
    # The image list beside the form says the same.
    expect(page.locator("#image-rows tr[data-image='disk.img']")).to_contain_text("web1")
    expect(page.locator("#image-rows tr[data-image='spare.img']")).to_contain_text("free")
    shoot(page, artifacts, "provision-in-use")


def test_custom_path_placeholder_is_the_daemons_image_dir(
    page: Page, make_node: Callable[[str], Node]
) -> None:
    node = make_node("intel-ready")
    login(page, node, "provision")
    page.select_option("#f-disk", "__custom__")
    path = page.locator("#f-disk-path")
    expect(path).to_be_visible()
    expect(path).to_have_attribute("placeholder", f"{node.env.images}/disk.img")
    expect(page.locator("#f-disk-hint")).to_contain_text(str(node.env.images))


def test_one_unit_system_binary_everywhere(page: Page, make_node: Callable[[str], Node]) -> None:
    """MB, MiB and GiB were mixed for the same numbers (the daemon's *_mb are MiB)."""
    node = make_node("intel-ready")
    login(page, node, "provision")
    expect(page.get_by_label("Memory (MiB)", exact=True)).to_be_visible()
    expect(page.locator("#f-memory-hint")).to_contain_text("128 to 128768 MiB")
    provision(page, "web1", memory="2048")
    row = page.locator("#vm-rows tr[data-vm='web1']")
    expect(row.locator("td").nth(4)).to_have_text("2 GiB")
    expect(page.locator("#ov-mem-total")).to_have_text("125.8 GiB")
    for view in ("overview", "provision", "hw"):
        page.click(f"#nav-{view}")
        text = page.locator(f"#view-{view}").inner_text()
        assert not re.search(r"\d\s*(MB|GB|TB)\b", text), (view, text)


def test_hw_settings_refresh_while_open(page: Page, make_node: Callable[[str], Node]) -> None:
    node = make_node("intel-ready")
    login(page, node, "hw")
    expect(page.locator("#vfio-state")).to_have_text("NOT LOADED")
    # The module appears behind the dashboard's back (someone ran modprobe on the node).
    module = node.env.sysroot / "sys/module/vfio_pci"
    module.mkdir(parents=True)
    expect(page.locator("#vfio-state")).to_have_text("LOADED", timeout=15_000)
    expect(page.locator("#vfio-toggle")).to_have_attribute("aria-checked", "true")


def test_provision_uses_the_width_of_a_desktop(
    page: Page, make_node: Callable[[str], Node]
) -> None:
    node = make_node("intel-ready")
    login(page, node, "provision")
    view = page.locator("#view-provision").bounding_box()
    form = page.locator("#vm-form").bounding_box()
    side = page.locator("#images-panel").bounding_box()
    assert view and form and side
    # Form and image list side by side, together filling the row.
    assert abs(form["y"] - side["y"]) < 2, (form, side)
    assert side["x"] > form["x"] + form["width"] - 1
    used = side["x"] + side["width"] - form["x"]
    assert used >= 0.95 * view["width"], (used, view)
    assert form["width"] >= 0.5 * view["width"], (form, view)

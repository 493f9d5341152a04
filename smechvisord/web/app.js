/* SmechVisor dashboard. No framework, no build step, no network but this node's API.
 *
 * Rule: data from the API reaches the page only as text (textContent, attribute values
 * set through the DOM). Nothing here assigns innerHTML/outerHTML or calls
 * insertAdjacentHTML/document.write: a VM name or a PCI string cannot become markup.
 */
"use strict";

(function () {
  const POLL_MS = 5000;
  const HEALTH_TIMEOUT_MS = 4000;
  const TOKEN_KEY = "smechvisor.token";
  const VIEWS = ["overview", "provision", "hw"];
  const LIVE = ["starting", "running", "paused"];
  const CONSOLE_MAX_CHARS = 256 * 1024;
  const CONSOLE_CHUNK = 65536;

  const state = {
    token: null,
    node: null,
    view: "overview",
    timer: null,
    polling: false,
    healthOk: null,
    consoleVm: null,
    consoleOffset: 0,
    busy: new Set(), // VM ids with an action in flight
    lastUpdate: null, // when data last arrived from the API (Date)
    offlineSince: null, // when the API stopped answering (Date), null while it answers
    vfioBusy: false,
    rebootRequested: false,
  };

  // ---- small DOM helpers (text only) -----------------------------------------------

  const $ = (id) => document.getElementById(id);

  /** el("td", {class: "num", title: "x"}, "text", childNode, ...) */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key === "disabled" || key === "hidden") node[key] = Boolean(value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  /** Label each cell with its column header, for the stacked phone layout (CSS attr()). */
  function labelCells(tbody) {
    const heads = Array.from(tbody.closest("table").querySelectorAll("thead th"), (th) => th.textContent);
    for (const tr of tbody.rows) {
      Array.from(tr.cells).forEach((td, i) => td.setAttribute("data-label", heads[i] || ""));
    }
  }

  function setText(id, value) {
    $(id).textContent = value === null || value === undefined || value === "" ? "\u2014" : String(value);
  }

  function fmtUptime(seconds) {
    if (typeof seconds !== "number") return "\u2014";
    const d = Math.floor(seconds / 86400);
    const h = Math.floor((seconds % 86400) / 3600);
    const m = Math.floor((seconds % 3600) / 60);
    return (d ? d + "d " : "") + String(h).padStart(d ? 2 : 1, "0") + "h " + String(m).padStart(2, "0") + "m";
  }

  /** One unit system, binary: the daemon's *_mb figures are MiB. 512 -> "512 MiB",
   *  2048 -> "2 GiB", 128768 -> "125.8 GiB". */
  function fmtMiB(mib) {
    if (typeof mib !== "number") return "\u2014";
    if (mib < 1024) return mib + " MiB";
    const gib = mib / 1024;
    return (Number.isInteger(gib) ? String(gib) : gib.toFixed(1)) + " GiB";
  }

  function fmtTime(date) {
    return date ? date.toLocaleTimeString([], { hour12: false }) : "\u2014";
  }

  function fmtBytes(n) {
    if (typeof n !== "number") return "?";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(n < 10 ? 1 : 0) : String(n)) + " " + units[i];
  }

  function orDash(v, suffix) {
    return v === null || v === undefined || v === "" ? "\u2014" : String(v) + (suffix || "");
  }

  function fmtNum(v, digits) {
    return typeof v === "number" ? v.toFixed(digits) : "\u2014";
  }

  // ---- notices ---------------------------------------------------------------------

  let noticeTimer = null;
  function notify(message, kind) {
    const box = $("notice");
    $("notice-text").textContent = message;
    box.dataset.kind = kind || "error";
    box.hidden = false;
    clearTimeout(noticeTimer);
    if (kind === "ok") noticeTimer = setTimeout(() => { box.hidden = true; }, 6000);
  }

  // ---- API -------------------------------------------------------------------------

  class ApiFailure extends Error {
    constructor(status, code, message, details) {
      super(message || "request failed (" + status + ")");
      this.status = status;
      this.code = code || "";
      this.details = details || {};
    }
  }

  async function api(method, path, body) {
    const headers = { Authorization: "Bearer " + state.token, Accept: "application/json" };
    const opts = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, opts);
    } catch (e) {
      // Say so at once (stale data, actions off) rather than at the next poll.
      if (state.healthOk !== false) checkHealth();
      throw new ApiFailure(0, "unreachable", "the node's API does not answer", {});
    }
    let doc = null;
    try {
      doc = await resp.json();
    } catch (e) {
      doc = null;
    }
    if (resp.status === 401 || resp.status === 403) {
      const msg = resp.status === 403 ? "The token was refused (wrong token)." : "A token is required.";
      toLogin(msg + " Sign in again.");
      throw new ApiFailure(resp.status, "auth", msg, {});
    }
    if (!resp.ok) {
      const err = (doc && doc.error) || {};
      throw new ApiFailure(resp.status, err.code, err.message || resp.statusText, err.details);
    }
    return doc;
  }

  // ---- health dot ------------------------------------------------------------------

  async function checkHealth() {
    const ctl = new AbortController();
    const t = setTimeout(() => ctl.abort(), HEALTH_TIMEOUT_MS);
    let ok = false;
    let version = "";
    try {
      const resp = await fetch("/api/health", { cache: "no-store", signal: ctl.signal, credentials: "omit" });
      if (resp.ok) {
        const doc = await resp.json();
        ok = doc && doc.status === "ok";
        version = (doc && doc.version) || "";
      }
    } catch (e) {
      ok = false;
    } finally {
      clearTimeout(t);
    }
    const dot = $("status-dot");
    const wasOk = state.healthOk;
    state.healthOk = ok;
    dot.dataset.state = ok ? "ok" : "down";
    $("status-text").textContent = ok ? "API online" : "API offline";
    $("status").title = (ok ? "API answers" : "API does not answer") + " \u00b7 checked " +
      new Date().toLocaleTimeString() + (version ? " \u00b7 smechvisord " + version : "");
    setOffline(!ok);
    return { ok, recovered: ok && wasOk === false };
  }

  // ---- offline: stale data, no actions ---------------------------------------------

  /** Buttons that act on the node; one that only changes this page (closing a panel)
   *  carries data-local and stays usable. Typing into a form is never blocked. */
  const ACTIONS = ".view:not(#view-login) button:not([data-local])";

  function dataArrived() {
    state.lastUpdate = new Date();
  }

  function setOffline(offline) {
    if (offline && !state.offlineSince) state.offlineSince = new Date();
    if (!offline) state.offlineSince = null;
    $("main").dataset.stale = offline ? "true" : "false";
    const banner = $("stale");
    banner.hidden = !offline || !state.token;
    if (offline) {
      $("stale-text").textContent = "The node's API does not answer (since " + fmtTime(state.offlineSince) +
        "). Showing data from the last update " + fmtTime(state.lastUpdate) +
        "; actions are off until the API is back.";
    }
    applyOffline();
  }

  /** Disable every action while offline (remembering which were on), restore them after.
   *  Called after each render too, so rows drawn while offline come out disabled. */
  function applyOffline() {
    const offline = state.offlineSince !== null;
    for (const node of document.querySelectorAll(ACTIONS)) {
      if (offline && !node.disabled) {
        node.disabled = true;
        node.dataset.offline = "1";
      } else if (!offline && node.dataset.offline) {
        node.disabled = false;
        delete node.dataset.offline;
      }
    }
    const link = $("ov-new-vm");
    if (offline) {
      link.setAttribute("aria-disabled", "true");
      link.tabIndex = -1;
    } else {
      link.removeAttribute("aria-disabled");
      link.removeAttribute("tabindex");
    }
  }

  async function tick() {
    state.timer = null;
    if (document.hidden) return;
    const { ok, recovered } = await checkHealth();
    if (ok && state.token) {
      try {
        // The open view refreshes on every poll, whichever it is.
        if (state.view === "overview") await refreshOverview();
        else if (state.view === "hw") await renderHw();
        else if (state.view === "provision") {
          if (recovered) await renderProvision();
          // Not while the picker is open: replacing its options would close it.
          else if (document.activeElement !== $("f-disk")) await loadImages();
        }
        if (state.consoleVm && $("console-follow").checked) await pullConsole(false);
      } catch (e) {
        /* the dot already tells; a refused token went to login */
      }
    }
    schedule();
  }

  function schedule() {
    clearTimeout(state.timer);
    state.timer = document.hidden ? null : setTimeout(tick, POLL_MS);
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      clearTimeout(state.timer);
      state.timer = null;
    } else {
      tick();
    }
  });

  // ---- login -----------------------------------------------------------------------

  function showOnly(viewId) {
    for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== viewId;
  }

  function toLogin(message) {
    state.token = null;
    state.node = null;
    sessionStorage.removeItem(TOKEN_KEY);
    $("nav").hidden = true;
    $("logout").hidden = true;
    $("notice").hidden = true;
    $("stale").hidden = true;
    setText("node-name", "");
    closeConsole();
    showOnly("view-login");
    $("login-error").textContent = message || "";
    $("login-token").value = "";
    $("login-token").focus();
  }

  async function signIn(token, fromForm) {
    state.token = token;
    try {
      await loadNode();
    } catch (e) {
      if (e.code !== "auth") {
        // Unreachable or a server error: keep the token, say why.
        showOnly("view-login");
        $("login-error").textContent = "Cannot reach the node: " + e.message;
        if (!fromForm) sessionStorage.setItem(TOKEN_KEY, token);
      }
      return false;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $("login-error").textContent = "";
    $("nav").hidden = false;
    $("logout").hidden = false;
    await route();
    return true;
  }

  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const token = $("login-token").value.trim();
    if (!token) {
      $("login-error").textContent = "Enter the API token.";
      return;
    }
    $("login-submit").disabled = true;
    try {
      await signIn(token, true);
    } finally {
      $("login-submit").disabled = false;
    }
  });

  $("logout").addEventListener("click", () => toLogin("Signed out."));
  $("notice-close").addEventListener("click", () => { $("notice").hidden = true; });

  // ---- routing ---------------------------------------------------------------------

  function currentView() {
    const name = location.hash.replace(/^#/, "");
    return VIEWS.includes(name) ? name : "overview";
  }

  async function route() {
    if (!state.token) return;
    state.view = currentView();
    for (const a of document.querySelectorAll("#nav a")) {
      if (a.dataset.view === state.view) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    showOnly("view-" + state.view);
    await renderView();
  }

  async function renderView() {
    try {
      if (state.view === "overview") await refreshOverview();
      else if (state.view === "provision") await renderProvision();
      else if (state.view === "hw") await renderHw();
    } catch (e) {
      if (e.code !== "auth") notify(e.message);
    }
  }

  window.addEventListener("hashchange", () => {
    if (location.hash.startsWith("#token=")) {
      boot();
      return;
    }
    route();
  });

  // ---- overview --------------------------------------------------------------------

  async function loadNode() {
    const node = await api("GET", "/api/node");
    state.node = node;
    dataArrived();
    setText("node-name", node.hostname);
    document.title = (node.hostname ? node.hostname + " \u00b7 " : "") + "SmechVisor";
    return node;
  }

  async function refreshOverview() {
    const [node, vms] = await Promise.all([loadNode(), api("GET", "/api/vms")]);
    renderNode(node);
    renderVms(Array.isArray(vms) ? vms : []);
  }

  function renderNode(n) {
    setText("ov-cpu-model", n.cpu_model);
    setText("ov-cpu-cores", n.cpu_cores);
    setText("ov-cpu-threads", n.cpu_threads);
    setText("ov-load", Array.isArray(n.load_average) ? n.load_average.map((x) => fmtNum(x, 2)).join(" ") : "");
    const total = n.memory_total_mb;
    const used = n.memory_used_mb;
    setText("ov-mem-used", fmtMiB(used));
    setText("ov-mem-total", fmtMiB(total));
    const bar = $("ov-mem-bar");
    if (typeof total === "number" && total > 0 && typeof used === "number") {
      const frac = Math.min(1, Math.max(0, used / total));
      bar.value = frac;
      bar.dataset.level = frac > 0.9 ? "crit" : frac > 0.75 ? "warn" : "ok";
      bar.setAttribute("aria-valuetext", Math.round(frac * 100) + "% used");
      setText("ov-mem-sub", Math.round(frac * 100) + "% used \u00b7 " + fmtMiB(total - used) + " available");
    }
    setText("ov-uptime", fmtUptime(n.uptime_seconds));
    setText("ov-boot", "boot " + (n.boot_mode || "?").toUpperCase());
    const kvm = $("ov-kvm");
    kvm.textContent = n.kvm_available ? "Available" : "Unavailable";
    kvm.dataset.ok = n.kvm_available ? "yes" : "no";
    const vmm = n.vmm || {};
    setText("ov-vmm", vmm.available ? "cloud-hypervisor " + (vmm.version || "?") : "cloud-hypervisor not installed");
    setText("ov-kernel", n.kernel);
    setText("ov-daemon", "smechvisord " + (n.daemon_version || "?"));
  }

  function actionButton(vm, action, label, opts) {
    const busy = state.busy.has(vm.id);
    const managed = vm.managed !== false;
    return el("button", {
      type: "button",
      class: "btn btn-sm" + (opts && opts.danger ? " btn-danger-ghost" : ""),
      dataset: { action, vm: vm.id },
      disabled: busy || !managed,
      title: managed ? null : "not started by this daemon: manage it where it was started",
      "aria-label": label + " " + vm.id,
    }, label);
  }

  function renderVms(vms) {
    const live = vms.filter((v) => LIVE.includes(v.state));
    const dead = vms.filter((v) => !LIVE.includes(v.state));

    const rows = live.map((vm) => {
      const actions = vm.managed === false
        ? el("span", { class: "hint" }, "not started by this daemon")
        : el("div", { class: "btn-row actions" },
        actionButton(vm, "shutdown", "Shut down"),
        actionButton(vm, "stop", "Stop", { danger: true }),
        vm.state === "paused" ? actionButton(vm, "resume", "Resume") : actionButton(vm, "pause", "Pause"),
        actionButton(vm, "console", "Console"),
      );
      return el("tr", { dataset: { vm: vm.id, state: vm.state } },
        el("td", { class: "vm-name" },
          el("span", { class: "mono" }, vm.name || vm.id),
          vm.managed === false ? el("span", { class: "tag", title: "found in /proc, not started by this daemon" }, "unmanaged") : null),
        el("td", {}, el("span", { class: "state state-" + vm.state }, vm.state)),
        el("td", { class: "num mono vm-pid" }, orDash(vm.pid)),
        el("td", { class: "num mono" }, orDash(vm.cpus)),
        el("td", { class: "num mono" }, fmtMiB(vm.memory_mb)),
        el("td", { class: "num mono" }, fmtNum(vm.cpu_percent, 1)),
        el("td", {}, actions),
      );
    });
    $("vm-rows").replaceChildren(...rows);
    labelCells($("vm-rows"));
    $("vm-count").textContent = String(live.length);
    $("vm-empty").hidden = live.length > 0;

    const deadRows = dead.map((vm) => {
      const exit = vm.exit || {};
      return el("tr", { dataset: { vm: vm.id, state: vm.state } },
        el("td", { class: "vm-name mono" }, vm.name || vm.id),
        el("td", {}, el("span", { class: "state state-" + vm.state }, vm.state)),
        el("td", { class: "exit-reason" }, exit.reason || "\u2014"),
        el("td", { class: "num mono" }, orDash(vm.cpus)),
        el("td", { class: "num mono" }, fmtMiB(vm.memory_mb)),
        el("td", {}, el("div", { class: "btn-row actions" },
          actionButton(vm, "start", "Start"),
          actionButton(vm, "console", "Console"),
          actionButton(vm, "delete", "Delete", { danger: true }))),
      );
    });
    $("stopped-rows").replaceChildren(...deadRows);
    labelCells($("stopped-rows"));
    $("stopped-count").textContent = String(dead.length);
    $("stopped-panel").hidden = dead.length === 0;
    applyOffline();
  }

  const CONFIRM = {
    shutdown: (id) => ["Shut down " + id + "?", "Sends the ACPI power button to " + id +
      "; the guest gets time to shut down, then it is stopped.", "Shut down"],
    stop: (id) => ["Force-stop " + id + "?", "Stops " + id +
      " at once, like pulling the power cord. Unsaved guest data is lost.", "Force stop"],
    delete: (id) => ["Delete " + id + "?", "Removes the record of " + id +
      ". The disk image stays where it is.", "Delete"],
  };

  async function onVmAction(ev) {
    const btn = ev.target.closest("button[data-action]");
    if (!btn) return;
    const id = btn.dataset.vm;
    const action = btn.dataset.action;
    if (action === "console") {
      openConsole(id);
      return;
    }
    if (CONFIRM[action]) {
      const [title, text, label] = CONFIRM[action](id);
      if (!(await confirmDialog(title, text, label))) return;
    }
    state.busy.add(id);
    btn.disabled = true;
    btn.textContent = "\u2026";
    try {
      if (action === "delete") await api("DELETE", "/api/vms/" + encodeURIComponent(id));
      else await api("POST", "/api/vms/" + encodeURIComponent(id) + "/" + action, {});
      notify(id + ": " + (action === "delete" ? "deleted" : action + " done"), "ok");
      if (action === "delete" && state.consoleVm === id) closeConsole();
    } catch (e) {
      if (e.code !== "auth") notify(id + ": " + action + " failed: " + e.message);
    } finally {
      state.busy.delete(id);
    }
    if (state.token) {
      try {
        await refreshOverview();
      } catch (e) {
        /* reported by the dot */
      }
    }
  }

  $("vm-rows").addEventListener("click", onVmAction);
  $("stopped-rows").addEventListener("click", onVmAction);

  // ---- console ---------------------------------------------------------------------

  function openConsole(id) {
    state.consoleVm = id;
    state.consoleOffset = 0;
    $("console-out").textContent = "";
    $("console-vm").textContent = id;
    $("console-panel").hidden = false;
    pullConsole(true).then(() => $("console-panel").scrollIntoView({ block: "nearest" }));
  }

  function closeConsole() {
    state.consoleVm = null;
    $("console-panel").hidden = true;
  }

  async function pullConsole(first) {
    const id = state.consoleVm;
    if (!id) return;
    let offset = state.consoleOffset;
    try {
      if (first) {
        // Start at the tail of a long log.
        const probe = await api("GET", "/api/vms/" + encodeURIComponent(id) + "/console?max_bytes=1");
        offset = Math.max(0, (probe.size || 0) - CONSOLE_CHUNK);
      }
      for (let i = 0; i < 8; i++) {
        const doc = await api("GET", "/api/vms/" + encodeURIComponent(id) + "/console?offset=" + offset +
          "&max_bytes=" + CONSOLE_CHUNK);
        if (state.consoleVm !== id) return;
        const out = $("console-out");
        const atBottom = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
        let text = out.textContent + (doc.data || "").replace(/\r\n/g, "\n");
        if (text.length > CONSOLE_MAX_CHARS) text = text.slice(text.length - CONSOLE_MAX_CHARS);
        out.textContent = text;
        if (atBottom || first) out.scrollTop = out.scrollHeight;
        const next = typeof doc.next_offset === "number" ? doc.next_offset : offset;
        const done = next === offset || next >= (doc.size || 0);
        offset = next;
        if (done) break;
      }
      state.consoleOffset = offset;
      if (!$("console-out").textContent) $("console-out").textContent = "(the serial log is empty)";
    } catch (e) {
      if (e.code !== "auth") $("console-out").textContent = "Cannot read the console log: " + e.message;
    }
  }

  $("console-refresh").addEventListener("click", () => { if (state.consoleVm) openConsole(state.consoleVm); });
  $("console-close").addEventListener("click", closeConsole);

  // ---- provision -------------------------------------------------------------------

  const CUSTOM = "__custom__";

  async function renderProvision() {
    const node = state.node || (await loadNode());
    const maxCpus = node.cpu_threads || node.cpu_cores || 1;
    const maxMem = node.memory_total_mb || 128;
    $("f-cpus").max = String(maxCpus);
    $("f-memory").max = String(maxMem);
    $("f-cpus-hint").textContent = "1 to " + maxCpus + " (the node's logical CPUs).";
    $("f-memory-hint").textContent = "128 to " + maxMem + " MiB (" + fmtMiB(maxMem) + ", the node's memory).";
    const caps = node.capabilities || {};
    const cap = $("create-cap");
    if (caps.create_vm === false) {
      const vmm = node.vmm || {};
      const why = !node.kvm_available ? "/dev/kvm is missing" : !vmm.available ? "cloud-hypervisor is not installed"
        : !vmm.firmware_present ? "the VM firmware (" + (vmm.firmware || "?") + ") is missing" : "the node cannot run VMs";
      cap.textContent = "This node cannot start VMs now: " + why + ".";
      cap.hidden = false;
    } else {
      cap.hidden = true;
    }
    await loadImages();
  }

  function usedBy(img) {
    return img.in_use ? "in use by " + ((img.used_by || []).join(", ") || "a running VM") : "";
  }

  async function loadImages() {
    const select = $("f-disk");
    const previous = select.value;
    let images;
    try {
      images = await api("GET", "/api/images");
    } catch (e) {
      if (e.code !== "auth") notify("Cannot list images: " + e.message);
      return;
    }
    images = Array.isArray(images) ? images : [];
    dataArrived();
    // The node says where images live; the picker's hint and the path example follow it.
    const dirs = (state.node && state.node.image_dirs) || Array.from(new Set(images.map((img) => img.dir)));
    $("f-disk-hint").textContent = dirs.length ? "Images found in " + dirs.join(", ") + "." : "No image dirs on this node.";
    $("image-dirs").textContent = dirs.join(", ");
    if (dirs.length) $("f-disk-path").placeholder = dirs[0].replace(/\/+$/, "") + "/disk.img";

    const options = images.map((img) => {
      const label = img.name + " \u2014 " + fmtBytes(img.size_bytes) + (img.in_use ? " \u2014 " + usedBy(img) : "");
      return el("option", { value: img.path, title: img.path, dataset: { inUse: img.in_use ? "yes" : "no" } }, label);
    });
    const free = images.filter((img) => !img.in_use);
    if (!images.length) options.push(el("option", { value: "", disabled: true }, "No images in the image dirs"));
    else if (!free.length) options.push(el("option", { value: "", disabled: true }, "Every image is in use"));
    options.push(el("option", { value: CUSTOM }, "Other path\u2026"));
    select.replaceChildren(...options);
    // Keep what the operator picked unless a VM took it meanwhile; never pre-select a
    // disk a running VM has (the daemon would refuse it).
    const keep = previous === CUSTOM || free.some((img) => img.path === previous);
    if (keep) select.value = previous;
    else if (free.length) select.value = free[0].path;
    else select.value = images.length ? "" : CUSTOM;
    syncDiskPath();
    renderImages(images);
    applyOffline();
  }

  function renderImages(images) {
    const rows = images.map((img) =>
      el("tr", { dataset: { image: img.name, inUse: img.in_use ? "yes" : "no" } },
        el("td", { class: "mono image-name", title: img.path }, img.name),
        el("td", { class: "num mono" }, fmtBytes(img.size_bytes)),
        el("td", {}, img.in_use
          ? el("span", { class: "state state-running" }, usedBy(img))
          : el("span", { class: "state state-stopped" }, "free"))));
    $("image-rows").replaceChildren(...rows);
    labelCells($("image-rows"));
    $("image-count").textContent = String(images.length);
    $("image-empty").hidden = images.length > 0;
  }

  function syncDiskPath() {
    const custom = $("f-disk").value === CUSTOM;
    $("f-disk-path").hidden = !custom;
    $("f-disk-path-label").hidden = !custom;
  }

  $("f-disk").addEventListener("change", () => {
    syncDiskPath();
    if ($("f-disk").value === CUSTOM) $("f-disk-path").focus();
  });
  $("images-refresh").addEventListener("click", () => loadImages());

  const FIELD_INPUT = { name: "f-name", cpus: "f-cpus", memory_mb: "f-memory", disk: "f-disk" };

  function clearErrors() {
    for (const p of document.querySelectorAll("#vm-form .field-error")) p.textContent = "";
    for (const input of document.querySelectorAll("#vm-form [aria-invalid]")) input.removeAttribute("aria-invalid");
  }

  function fieldError(field, message) {
    const target = document.querySelector('#vm-form .field-error[data-field="' + field + '"]');
    if (!target) {
      $("f-form-error").textContent = (field ? field + ": " : "") + message;
      return;
    }
    target.textContent = message;
    let input = $(FIELD_INPUT[field]);
    if (field === "disk" && $("f-disk").value === CUSTOM) input = $("f-disk-path");
    if (input) input.setAttribute("aria-invalid", "true");
  }

  function readInt(id) {
    const raw = $(id).value.trim();
    return /^[0-9]+$/.test(raw) ? Number(raw) : NaN;
  }

  function validateForm() {
    const node = state.node || {};
    const maxCpus = node.cpu_threads || node.cpu_cores || 1;
    const maxMem = node.memory_total_mb || 128;
    const errors = [];
    const name = $("f-name").value.trim();
    if (name && !/^[a-z0-9][a-z0-9-]{0,31}$/.test(name)) {
      errors.push(["name", "Use 1-32 characters of a-z, 0-9 and '-', starting with a letter or digit."]);
    }
    const cpus = readInt("f-cpus");
    if (!(cpus >= 1 && cpus <= maxCpus)) errors.push(["cpus", "vCPUs must be a whole number from 1 to " + maxCpus + "."]);
    const mem = readInt("f-memory");
    if (!(mem >= 128 && mem <= maxMem)) errors.push(["memory_mb", "Memory must be a whole number of MiB from 128 to " + maxMem + "."]);
    const disk = $("f-disk").value === CUSTOM ? $("f-disk-path").value.trim() : $("f-disk").value;
    if (!disk) errors.push(["disk", "Pick a disk image."]);
    else if (!disk.startsWith("/")) errors.push(["disk", "The image path must be absolute."]);
    const body = { cpus, memory_mb: mem, disk };
    if (name) body.name = name;
    return { errors, body };
  }

  $("vm-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors();
    const { errors, body } = validateForm();
    if (errors.length) {
      for (const [field, message] of errors) fieldError(field, message);
      $(FIELD_INPUT[errors[0][0]]).focus();
      return;
    }
    const submit = $("vm-submit");
    if (state.offlineSince) return;
    submit.disabled = true;
    submit.textContent = "Starting\u2026";
    try {
      const vm = await api("POST", "/api/vms", body);
      notify("VM " + vm.id + " started (PID " + vm.pid + ").", "ok");
      $("f-name").value = "";
      location.hash = "#overview";
    } catch (e) {
      if (e.code === "auth") return;
      const field = e.details && e.details.field;
      if (field) fieldError(field, e.message);
      else $("f-form-error").textContent = e.message;
    } finally {
      submit.disabled = false;
      submit.textContent = "Create and start VM";
    }
  });

  // ---- HW settings -----------------------------------------------------------------

  async function renderHw() {
    const [node, iommu, vfio, pci, reboot] = await Promise.all([
      loadNode(), api("GET", "/api/iommu"), api("GET", "/api/vfio"), api("GET", "/api/pci"), api("GET", "/api/reboot-uefi"),
    ]);
    dataArrived();
    renderIommu(iommu);
    renderVfio(vfio);
    renderPci(Array.isArray(pci) ? pci : []);
    renderReboot(reboot, node);
    applyOffline();
  }

  function renderIommu(r) {
    const summary = $("iommu-summary");
    summary.textContent = r.ready ? "READY" : "NOT READY";
    summary.dataset.ok = r.ready ? "yes" : "no";
    const items = (r.checks || []).map((c) =>
      el("li", { class: "check-item", dataset: { check: c.id, ok: c.ok ? "yes" : "no" } },
        el("span", { class: "check-state", "aria-label": c.ok ? "passes" : "fails" }, c.ok ? "PASS" : "FAIL"),
        el("div", { class: "check-body" },
          el("p", { class: "check-label" }, c.label),
          el("p", { class: "check-detail" }, c.detail),
          c.fix ? el("p", { class: "check-fix" }, el("span", { class: "k" }, "Fix "), c.fix) : null)));
    $("iommu-checks").replaceChildren(...items);
  }

  function renderVfio(v) {
    const toggle = $("vfio-toggle");
    toggle.setAttribute("aria-checked", v.loaded ? "true" : "false");
    const st = $("vfio-state");
    st.textContent = v.loaded ? "LOADED" : "NOT LOADED";
    st.dataset.ok = v.loaded ? "yes" : "idle";
    // Loading needs a ready IOMMU; unloading is always allowed.
    const blocked = !v.loaded && !v.ready;
    toggle.disabled = blocked || state.vfioBusy;
    const reason = $("vfio-reason");
    if (blocked) {
      reason.textContent = "Blocked: " + ((v.blockers || []).join("; ") || "the IOMMU is not ready");
      reason.dataset.kind = "blocked";
    } else {
      reason.textContent = v.loaded ? "vfio-pci is loaded. Switch off to unload it (modprobe -r vfio-pci)."
        : "IOMMU ready. Switch on to load vfio-pci (modprobe vfio-pci).";
      reason.dataset.kind = "";
    }
  }

  $("vfio-toggle").addEventListener("click", async () => {
    const toggle = $("vfio-toggle");
    const enable = toggle.getAttribute("aria-checked") !== "true";
    toggle.disabled = true;
    state.vfioBusy = true;
    $("vfio-result").textContent = (enable ? "Loading" : "Unloading") + " vfio-pci\u2026";
    try {
      const res = await api("POST", "/api/vfio", { enable });
      $("vfio-result").textContent = (res.command ? "Ran: " + [].concat(res.command).join(" ") + ". " : "") +
        (res.loaded ? "vfio-pci is loaded." : "vfio-pci is not loaded.");
    } catch (e) {
      if (e.code === "auth") return;
      $("vfio-result").textContent = "Failed: " + e.message;
    }
    state.vfioBusy = false;
    try {
      renderVfio(await api("GET", "/api/vfio"));
    } catch (e) {
      /* shown by the dot or login */
    }
  });

  function renderPci(devices) {
    const rows = devices.map((d) => {
      const why = (d.reasons || []).join("; ");
      return el("tr", { dataset: { bdf: d.address } },
        el("td", { class: "mono" }, d.address),
        el("td", {}, d.class_name || d.class_id || "\u2014"),
        el("td", { class: "mono" }, (d.vendor_id || "?") + ":" + (d.device_id || "?")),
        el("td", { class: "mono" }, d.driver || "\u2014"),
        el("td", { class: "num mono" }, d.iommu_group === null || d.iommu_group === undefined ? "none" : String(d.iommu_group)),
        el("td", { class: "pci-viable" },
          el("span", { class: "state " + (d.viable ? "state-running" : "state-stopped") }, d.viable ? "viable" : "no"),
          why ? el("span", { class: "pci-why" }, " " + why) : null,
          d.group_devices && d.group_devices.length > 1
            ? el("span", { class: "pci-group" }, " group: " + d.group_devices.join(", ")) : null));
    });
    $("pci-rows").replaceChildren(...rows);
    labelCells($("pci-rows"));
    $("pci-count").textContent = String(devices.length);
  }

  function renderReboot(r, node) {
    const btn = $("reboot-btn");
    // Once a reboot is requested the button stays off: the node is going down.
    btn.disabled = !r.supported || state.rebootRequested;
    const reason = $("reboot-reason");
    if (r.supported) {
      reason.textContent = "Supported by this node's firmware.";
      reason.dataset.kind = "";
    } else {
      reason.textContent = "Unavailable: " + (r.reason || "the firmware does not support it");
      reason.dataset.kind = "blocked";
    }
    state.rebootVms = node && node.vms_running;
  }

  $("reboot-btn").addEventListener("click", async () => {
    const host = (state.node && state.node.hostname) || "this node";
    const running = (state.node && state.node.vms_running) || 0;
    const ok = await confirmDialog(
      "Restart " + host + " to UEFI firmware?",
      "The node " + host + " and its VMs will go down: " + running + " running VM(s) are shut down, " +
        "then the node reboots into its firmware setup screen. It stays there until someone at the console exits setup.",
      "Restart to firmware");
    if (!ok) {
      $("reboot-result").textContent = "Cancelled. Nothing was changed.";
      return;
    }
    $("reboot-btn").disabled = true;
    $("reboot-result").textContent = "Requesting firmware setup and rebooting\u2026";
    try {
      await api("POST", "/api/reboot-uefi", { confirm: true });
      state.rebootRequested = true;
      $("reboot-result").textContent = "Reboot requested: OsIndications set; the node is going down.";
    } catch (e) {
      if (e.code === "auth") return;
      $("reboot-result").textContent = "Failed: " + e.message;
      $("reboot-btn").disabled = false;
    }
  });

  // ---- confirmation dialog ---------------------------------------------------------

  function confirmDialog(title, text, okLabel) {
    const dlg = $("confirm-dialog");
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = okLabel || "Confirm";
    dlg.returnValue = "cancel";
    return new Promise((resolve) => {
      dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok"), { once: true });
      dlg.showModal();
      $("confirm-cancel").focus();
    });
  }

  // ---- start -----------------------------------------------------------------------

  async function boot() {
    let token = null;
    const m = location.hash.match(/^#token=([^&]*)/);
    if (m) {
      token = decodeURIComponent(m[1]);
      // Keep the token out of the address bar and history.
      history.replaceState(null, "", location.pathname + location.search + "#overview");
    } else {
      token = sessionStorage.getItem(TOKEN_KEY);
    }
    if (token) await signIn(token, false);
    else toLogin("");
  }

  boot();
  tick();
})();

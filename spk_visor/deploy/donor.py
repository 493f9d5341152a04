"""The donor side of a deploy (design/deploy.md): one session per code, several at once.

    find the target (discovery by nameplate, or --target) -> donor_handshake -> HELLO
    -> PLAN (manifest, disk by serial + size, layout, hostname, wipe confirmation)
    -> PLAN_OK {resume, verified} -> FILE_BEGIN/DATA.../FILE_END per missing blob
    -> END -> REPORT -> REBOOT (only when the REPORT says ok)

The payload is a signed OTA release: a bundle (.spkb), or the release this node runs, from
its OTA store (the signed manifest and its blobs, as `ota apply`/`pull` and deploy keep
them). Nothing is re-signed; the donor parses the manifest only to know the blob order
and sizes. It verifies nothing on the target's behalf: the target checks
the signatures against its own trust root and every blob against the manifest.

While the donor streams, a reader thread takes the target's records (PROGRESS, PHASE,
FILE_OK/FILE_BAD, REPORT, ERROR), so the target's durable-bytes progress reaches the
screen without the sender waiting for it.
"""

from __future__ import annotations

import ipaddress
import math
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from spk_visor import output
from spk_visor.deploy import channel, code, messages
from spk_visor.errors import (
    ExitCode,
    OperatorNeededError,
    SpkVisorError,
    UsageError,
    VerificationError,
)
from spk_visor.ota import bundle as ota_bundle
from spk_visor.trust import dsse
from spk_visor.trust import manifest as ota_manifest

if TYPE_CHECKING:
    from spk_visor.ota.nodeconf import NodePaths

RECORD = 64 << 10
CONNECT_TIMEOUT = 10.0
# A target writes, verifies and installs the bootloader before REPORT; this bounds silence.
REPLY_TIMEOUT = 600.0


class DeployFailed(SpkVisorError):
    """One target's deploy failed in `phase`, with the exit code that failure means."""

    def __init__(self, exit_code: ExitCode, phase: str, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.phase = phase


@dataclass(frozen=True)
class Payload:
    """A release opened for sending: the manifest envelope and where each blob lies (a
    file and an offset in it: one bundle for all, or one store file each)."""

    path: Path
    manifest_doc: dict[str, Any]
    manifest_sha256: str
    blobs: dict[str, int]  # in manifest order
    offsets: dict[str, int]
    version: str = ""
    counter: int = 0
    source: str = ""  # for the report: "bundle FILE" or "this node's OTA store"
    files: dict[str, Path] | None = None  # per blob; None: every blob lies in `path`

    @property
    def total(self) -> int:
        return sum(self.blobs.values())

    def file_of(self, blob_id: str) -> Path:
        return self.path if self.files is None else self.files[blob_id]

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "counter": self.counter,
            "manifest_sha256": self.manifest_sha256,
            "source": self.source,
        }


def open_bundle(path: Path) -> Payload:
    """Read `path`'s header and manifest (unverified: the target verifies) for sending."""
    ota_bundle.check_is_bundle(path)
    try:
        with path.open("rb") as f:
            header = ota_bundle.read_header(f)
            size = path.stat().st_size
    except OSError as e:
        raise UsageError(
            f"cannot read the bundle {path}: {e.strerror or e}", ota_bundle.missing_hint(e)
        ) from e
    parsed = ota_manifest.parse(header.manifest.payload_json())
    offsets: dict[str, int] = {}
    at = header.blobs_offset
    for blob_id, blob_size in parsed.blobs.items():
        offsets[blob_id] = at
        at += blob_size
    if at != size:
        raise VerificationError(
            f"bundle {path} is {size} bytes, its manifest says {at}", "copy the bundle again"
        )
    return Payload(
        path,
        header.manifest.to_doc(),
        header.manifest.payload_sha256,
        dict(parsed.blobs),
        offsets,
        parsed.release.version,
        parsed.release.counter,
        f"bundle {path}",
    )


def open_node_release(paths: NodePaths) -> Payload:
    """The signed release this node runs, from its OTA store, for sending as it is.

    "Runs" is what installed.json names: the newest committed manifest (an OTA commit or
    the deploy that installed the node writes it). Its envelope goes out byte for byte;
    the target checks the release's own signatures, exactly as for a bundle.

    UsageError (2): nothing installed here (not a node; pass --bundle). OperatorNeededError
    (9): the store lacks the manifest or a blob; the message names it and how to get it.
    """
    # Here, not at the top: a send with --bundle never reads a store (start-up time).
    from spk_visor.ota.journal import Installed  # noqa: PLC0415
    from spk_visor.ota.store import BlobStore  # noqa: PLC0415

    installed = Installed(paths)
    try:
        doc = installed.read()
    except (OSError, ValueError) as e:
        raise UsageError(
            f"cannot read {installed.path}: {e}", "pass the release with --bundle FILE"
        ) from e
    manifest_hex = doc.get("manifest")
    if not isinstance(manifest_hex, str) or not manifest_hex:
        raise UsageError(
            f"this machine has no installed release to send ({installed.path} names none)",
            "pass the release with --bundle FILE (spk-visor ota build makes one)",
        )
    store = BlobStore(paths)
    fix = "run `spk-visor ota pull` to fetch it, or pass the release with --bundle FILE"
    try:
        raw = store.load_manifest(manifest_hex)
    except OSError as e:
        raise OperatorNeededError(
            f"this node's OTA store lacks the signed manifest {manifest_hex[:12]}… of the "
            f"release it runs ({store.manifests_dir})",
            fix,
        ) from e
    try:
        env = dsse.from_bytes(raw, dsse.MANIFEST_TYPE)
        parsed = ota_manifest.parse(env.payload_json())
    except (VerificationError, ValueError, TypeError, KeyError) as e:
        raise OperatorNeededError(
            f"the stored manifest {manifest_hex[:12]}… cannot be read: {e}", fix
        ) from e
    if env.payload_sha256 != manifest_hex:
        raise OperatorNeededError(
            f"the stored manifest {manifest_hex[:12]}… does not match its name", fix
        )
    what = {}
    if parsed.image is not None:
        what[parsed.image.blob] = "base image"
    if parsed.daemon is not None:
        what[parsed.daemon.pack] = "daemon pack"
    for blob_id, size in parsed.blobs.items():
        if not store.has(blob_id, size):
            raise OperatorNeededError(
                f"this node's OTA store lacks blob {blob_id} ({what.get(blob_id, 'blob')}, "
                f"{size} bytes) of release {parsed.release.version} "
                f"(manifest {manifest_hex[:12]}…)",
                fix,
            )
    blobs = dict(parsed.blobs)
    return Payload(
        store.blobs_dir,
        env.to_doc(),
        manifest_hex,
        blobs,
        dict.fromkeys(blobs, 0),
        parsed.release.version,
        parsed.release.counter,
        "this node's OTA store",
        {b: store.path(b) for b in blobs},
    )


@dataclass
class Target:
    """Where one code's target is: from --target, or from its announcement."""

    code_text: str
    nameplate: str
    address: str
    port: int
    epoch: int | None
    instance_id: bytes | None = None

    @property
    def name(self) -> str:
        return f"{self.nameplate}@{self.address}"


@dataclass
class Result:
    target: str
    ok: bool
    exit_code: int
    phase: str
    message: str
    seconds: float = 0.0
    sent: int = 0
    verifier: str = ""
    report: dict[str, Any] | None = None
    resumed: bool = False
    release: dict[str, Any] | None = None  # Payload.describe(): which release was sent

    def to_doc(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "phase": self.phase,
            "message": self.message,
            "seconds": round(self.seconds, 3),
            "sent": self.sent,
            "verifier": self.verifier,
            "resumed": self.resumed,
            "release": self.release,
            "report": self.report,
        }


class Progress(Protocol):
    def phase(self, name: str) -> None: ...
    def sent(self, done: int) -> None: ...
    def target(self, doc: dict[str, Any]) -> None: ...
    def done(self) -> None: ...
    def close(self) -> None: ...


class _Silent:
    def phase(self, name: str) -> None:
        pass

    def sent(self, done: int) -> None:
        pass

    def target(self, doc: dict[str, Any]) -> None:
        pass

    def done(self) -> None:
        pass

    def close(self) -> None:
        pass


ProgressFactory = Callable[[str, int, int], Progress]  # (name, total bytes, position)


def no_progress(name: str, total: int, position: int) -> Progress:
    return _Silent()


class _Bar:
    """One tqdm line per target: the target's durable bytes, rate and phase."""

    def __init__(self, name: str, total: int, position: int) -> None:
        from tqdm import tqdm  # noqa: PLC0415 (only when drawing)

        self.bar = tqdm(
            total=total,
            desc=name,
            position=position,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            leave=True,
            dynamic_ncols=True,
        )
        self.lock = threading.Lock()

    def phase(self, name: str) -> None:
        with self.lock:
            self.bar.set_postfix_str(name)

    def sent(self, done: int) -> None:
        pass  # the bar shows what the target made durable, not what left this machine

    def target(self, doc: dict[str, Any]) -> None:
        written = doc.get("written")
        if isinstance(written, int):
            with self.lock:
                # Never 100 % before the REPORT: hold the last byte back until then.
                total = int(self.bar.total or 0)
                self.bar.n = min(written, max(total - 1, 0))
                self.bar.refresh()

    def done(self) -> None:
        with self.lock:
            self.bar.n = int(self.bar.total or 0)
            self.bar.set_postfix_str("done")

    def close(self) -> None:
        with self.lock:
            self.bar.close()


def tqdm_progress(name: str, total: int, position: int) -> Progress:
    return _Bar(name, total, position)


@dataclass
class Settings:
    disks: Sequence[str] = ()
    confirm_wipe: Sequence[str] = ()
    hostname: str = "smechvisor"
    layout: str = "ab"
    authorized_keys: str | None = None  # validated (authkeys.validate) `authorized_keys` lines
    reboot: bool = True
    handshake_timeout: float = 10.0
    reply_timeout: float = REPLY_TIMEOUT
    # Test hook: stop after sending this many DATA bytes of the stream (a "killed" donor).
    stop_after: int | None = None
    send_end: bool = True


def parse_target(text: str) -> tuple[str, int]:
    """--target IP, IP:PORT, [IPv6]:PORT or a bare IPv6 address. Checked up front: a typo
    would otherwise surface as a "transient" failure to connect (exit 7)."""
    host, port_text = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            host = ""  # refused below
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    bad = UsageError(f"bad --target {text!r}", "use IP, IP:PORT or [IPv6]:PORT")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise bad from None
    if not port_text:
        return host, channel.PORT
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise bad
    return host, int(port_text)


def check_arguments(codes: Sequence[str], targets: Sequence[str]) -> None:
    """What the operator typed for `deploy send`, checked before anything is read, said or
    sent: each code, one --target per code if any, and no code or target given twice (two
    sessions to one target: the second is refused as BUSY, after the first one's code
    attempt)."""
    typed: dict[tuple[str, str], str] = {}
    for text in codes:
        try:
            parsed = code.parse(text)
        except ValueError as e:
            raise UsageError(str(e)) from e
        # Two targets may show one nameplate (each has its own secret); one code twice is
        # one target.
        if parsed in typed:
            raise UsageError(
                f"code {typed[parsed]!r} is given twice", "give each target's code once"
            )
        typed[parsed] = text.strip()
    if targets and len(targets) != len(codes):
        raise UsageError(
            f"{len(codes)} codes but {len(targets)} --target",
            "give one --target per code, in order",
        )
    seen: dict[tuple[str, int], str] = {}
    for text in targets:
        address = parse_target(text)
        if address in seen:
            raise UsageError(
                f"--target {seen[address]!r} and {text!r} name the same address",
                "give one --target per code, each a different target",
            )
        seen[address] = text


def locate(
    codes: Sequence[str],
    targets: Sequence[str],
    *,
    epoch: int | None = None,
    discovery_port: int = channel.DISCOVERY_PORT,
    discovery_timeout: float = 30.0,
) -> list[Target]:
    """Each code's target: the --target given in the same position, else discovery."""
    check_arguments(codes, targets)
    out: list[Target] = []
    for i, text in enumerate(codes):
        nameplate, _ = code.parse(text)
        if targets:
            host, port = parse_target(targets[i])
            out.append(Target(text, nameplate, host, port, epoch))
            continue
        from spk_visor.deploy import discovery  # noqa: PLC0415 (not with --target)

        found = discovery.discover(nameplate, port=discovery_port, timeout=discovery_timeout)
        if not found:
            raise DeployFailed(
                ExitCode.TRANSIENT,
                "discovery",
                f"no target announces nameplate {nameplate} (waited {discovery_timeout:g} s); "
                "pass --target IP[:PORT] where broadcasts do not reach",
            )
        if len(found) > 1:
            listed = ", ".join(f"{a.address} (mac {a.mac})" for a in found)
            # Never sweep every match: each try burns one of that target's attempts.
            raise UsageError(
                f"{len(found)} targets announce nameplate {nameplate}: {listed}",
                "pick one with --target IP[:PORT]",
            )
        ann = found[0]
        out.append(
            Target(
                text,
                nameplate,
                ann.address,
                ann.port,
                ann.epoch if epoch is None else epoch,
                bytes.fromhex(ann.instance_id),
            )
        )
    return out


class _Session:
    def __init__(
        self, target: Target, payload: Payload, settings: Settings, progress: Progress
    ) -> None:
        self.target = target
        self.payload = payload
        self.settings = settings
        self.progress = progress
        self.phase = "connecting"
        self.sent = 0
        self.inbox: queue.Queue[tuple[int, dict[str, Any]] | BaseException] = queue.Queue()
        self.verifier = ""
        self.resumed = False

    def fail(self, exit_code: ExitCode, message: str) -> DeployFailed:
        return DeployFailed(exit_code, self.phase, message)

    def run(self) -> dict[str, Any]:
        t = self.target
        try:
            sock = socket.create_connection((t.address, t.port), timeout=CONNECT_TIMEOUT)
        except OSError as e:
            raise self.fail(
                ExitCode.TRANSIENT, f"cannot connect to {t.address}:{t.port}: {e}"
            ) from e
        try:
            return self._run(sock)
        finally:
            sock.close()

    def _handshake(self, sock: socket.socket) -> channel.SecureChannel:
        self.phase = "handshake"
        instance_id = self.target.instance_id
        try:
            return channel.donor_handshake(
                sock,
                self.target.code_text,
                self.target.epoch,
                instance_id,
                timeout=self.settings.handshake_timeout,
            )
        except channel.TargetBusy as e:
            if e.retry_after is not None:
                wait = math.ceil(e.retry_after)
                raise self.fail(
                    ExitCode.BUSY,
                    f"the target is in its wrong-code wait ({e.retry_after:.1f} s left) after "
                    f"a wrong code attempt: run the command again in {wait} s",
                ) from e
            raise self.fail(ExitCode.BUSY, "the target is serving another donor (BUSY)") from e
        except channel.Limited as e:
            # A few seconds: the pause after this machine's last wrong code. Longer: it used
            # its wrong-code budget (docs/deploy-security.md).
            if e.retry_after is not None and e.reason == "wrong_code_wait" and e.retry_after <= 10:
                wait = math.ceil(e.retry_after)
                raise self.fail(
                    ExitCode.NOT_ELIGIBLE,
                    f"the target is in its wrong-code wait for this machine "
                    f"({e.retry_after:.1f} s left) after a wrong code attempt: check the code "
                    f"on its screen and run the command again in {wait} s",
                ) from e
            if e.retry_after is not None and e.reason == "wrong_code_wait":
                raise self.fail(
                    ExitCode.NOT_ELIGIBLE,
                    f"the target takes no code attempt from this machine for "
                    f"{math.ceil(e.retry_after)} s (too many wrong codes from it); check the "
                    "code on its screen before trying again",
                ) from e
            if e.retry_after is not None:
                raise self.fail(
                    ExitCode.NOT_ELIGIBLE,
                    f"the target's code took too many wrong attempts: it shows a new code in "
                    f"{math.ceil(e.retry_after)} s; read it from the screen then",
                ) from e
            raise self.fail(
                ExitCode.NOT_ELIGIBLE,
                "the target takes no code attempt from this machine now (too many wrong "
                "codes); check the code on its screen and try again in a few minutes",
            ) from e
        except channel.WrongCode as e:
            raise self.fail(
                ExitCode.REFUSED,
                "the target did not accept the code (wrong code, or it rotated: "
                "read the code on its screen again)",
            ) from e
        except (channel.ChannelError, OSError) as e:
            raise self.fail(ExitCode.TRANSIENT, f"handshake failed: {e}") from e

    def _run(self, sock: socket.socket) -> dict[str, Any]:
        chan = self._handshake(sock)
        self.verifier = chan.verifier
        chan.settimeout(self.settings.reply_timeout)
        try:
            return self._authenticated(chan)
        except DeployFailed as e:
            # Tell the target why we stop, so it does not report a truncated stream.
            if e.exit_code != ExitCode.TRANSIENT:
                chan.send_error(e.message)
            raise
        except (channel.ChannelError, OSError) as e:
            raise self.fail(ExitCode.TRANSIENT, f"connection lost: {e}") from e
        finally:
            chan.close()

    def _authenticated(self, chan: channel.SecureChannel) -> dict[str, Any]:
        self.phase = "hello"
        mtype, hello = chan.recv_json()
        if mtype == messages.BUSY:
            raise self.fail(ExitCode.BUSY, "the target is serving another donor (BUSY)")
        if mtype != messages.HELLO:
            raise self.fail(ExitCode.INTERNAL, f"expected HELLO, got message {mtype}")
        plan = self.plan(hello)
        self.phase = "plan"
        chan.send_json(messages.PLAN, plan)
        mtype, answer = chan.recv_json()
        if mtype == messages.PLAN_REFUSED:
            reason = str(answer.get("reason", "unknown"))
            detail = str(answer.get("message", ""))
            raise self.fail(ExitCode.REFUSED, f"PLAN_REFUSED {messages.refusal(reason, detail)}")
        if mtype != messages.PLAN_OK:
            raise self.fail(ExitCode.INTERNAL, f"expected PLAN_OK, got message {mtype}")
        self.resumed = bool(answer.get("resume"))
        verified = {str(b) for b in answer.get("verified") or []}
        reader = threading.Thread(target=self._reader, args=(chan,), daemon=True)
        reader.start()
        self.phase = "sending"
        for blob_id, size in self.payload.blobs.items():
            if blob_id in verified:
                continue
            for attempt in (1, 2):
                with self.payload.file_of(blob_id).open("rb") as f:
                    self._send_blob(chan, f, blob_id, size)
                mtype, doc = self._next(messages.FILE_OK, messages.FILE_BAD)
                if mtype == messages.FILE_OK:
                    break
                if attempt == 2:
                    raise self.fail(
                        ExitCode.REFUSED,
                        f"the target rejected blob {blob_id} twice: {doc.get('reason')}",
                    )
        if not self.settings.send_end:
            raise self.fail(ExitCode.TRANSIENT, "stopped before END (test hook)")
        chan.send(messages.END)
        self.phase = "finishing"
        _, report = self._next(messages.REPORT)
        if not report.get("ok"):
            raise self.fail(ExitCode.OPERATOR_NEEDED, f"the target reports failure: {report}")
        if self.settings.reboot:
            chan.send(messages.REBOOT)
        self.phase = "done"
        return report

    def plan(self, hello: dict[str, Any]) -> dict[str, Any]:
        listed = hello.get("disks")
        disks = [d for d in listed if isinstance(d, dict)] if isinstance(listed, list) else []
        wanted = set(self.settings.disks)
        if wanted:
            chosen = [d for d in disks if d.get("serial") in wanted]
        else:
            chosen = [d for d in disks if d.get("eligible")]
        if len(chosen) != 1:
            listed = ", ".join(_describe_disk(d) for d in disks)
            if chosen:
                why = f"{len(chosen)} disks match --disk"
            else:
                why = "no disk matches --disk" if wanted else "not exactly one eligible disk"
            raise self.fail(
                ExitCode.REFUSED,
                f"{why}; the target has: {listed or 'no disks'}; name one with --disk SERIAL",
            )
        disk = chosen[0]
        serial = str(disk.get("serial"))
        plan: dict[str, Any] = {
            "manifest": self.payload.manifest_doc,
            "disk": {"serial": serial, "size": disk.get("size")},
            "layout": self.settings.layout,
            "hostname": self.settings.hostname,
            "confirm_wipe_serial": serial if serial in self.settings.confirm_wipe else None,
        }
        if self.settings.authorized_keys is not None:
            # Only when asked: a target from before this key refuses unknown PLAN keys.
            plan["authorized_keys"] = self.settings.authorized_keys
        return plan

    def _send_blob(self, chan: channel.SecureChannel, f: BinaryIO, blob_id: str, size: int) -> None:
        chan.send_json(messages.FILE_BEGIN, {"blob_id": blob_id, "size": size})
        f.seek(self.payload.offsets[blob_id])

        def sent(n: int) -> None:
            self.sent += n
            self.progress.sent(self.sent)
            stop = self.settings.stop_after
            if stop is not None and self.sent >= stop:
                raise self.fail(ExitCode.TRANSIENT, "stopped mid-file (test hook)")

        try:
            chan.send_stream(messages.DATA, f, size, progress=sent)
        except ValueError as e:
            raise self.fail(ExitCode.REFUSED, f"the bundle ends inside blob {blob_id}") from e
        chan.send(messages.FILE_END)

    def _reader(self, chan: channel.SecureChannel) -> None:
        try:
            while True:
                # recv_json: a payload that is not a JSON object is a ChannelError (exit 7),
                # not a ValueError/AttributeError escaping the worker thread.
                mtype, doc = chan.recv_json()
                if mtype == messages.PROGRESS:
                    self.progress.target(doc)
                elif mtype == messages.PHASE:
                    self.progress.phase(str(doc.get("phase")))
                else:
                    self.inbox.put((mtype, doc))
                    if mtype in (messages.REPORT, messages.ERROR):
                        return
        except BaseException as e:
            self.inbox.put(e)

    def _next(self, *wanted: int) -> tuple[int, dict[str, Any]]:
        try:
            item = self.inbox.get(timeout=self.settings.reply_timeout)
        except queue.Empty as e:
            raise self.fail(ExitCode.TRANSIENT, "the target went silent") from e
        if isinstance(item, BaseException):
            if isinstance(item, (channel.ChannelError, OSError)):
                raise self.fail(ExitCode.TRANSIENT, f"connection lost: {item}") from item
            raise item
        mtype, doc = item
        if mtype == messages.ERROR:
            raise self.fail(ExitCode.REFUSED, f"the target failed: {doc.get('reason')}")
        if mtype not in wanted:
            raise self.fail(ExitCode.INTERNAL, f"unexpected message {mtype} from the target")
        return mtype, doc


def _describe_disk(d: dict[str, Any]) -> str:
    why = "" if d.get("eligible") else ", ineligible: " + ",".join(d.get("reasons") or [])
    size = d.get("size")
    shown = output.size(size) if isinstance(size, int) else "size unknown"
    return f"{d.get('serial') or '?'} ({shown}, {d.get('model') or 'no model'}{why})"


def deploy_one(target: Target, payload: Payload, settings: Settings, progress: Progress) -> Result:
    start = time.monotonic()
    session = _Session(target, payload, settings, progress)
    try:
        report = session.run()
        progress.done()
    except DeployFailed as e:
        return Result(
            target.name,
            False,
            int(e.exit_code),
            e.phase,
            e.message,
            time.monotonic() - start,
            session.sent,
            session.verifier,
            resumed=session.resumed,
            release=payload.describe(),
        )
    finally:
        progress.close()
    return Result(
        target.name,
        True,
        int(ExitCode.OK),
        "done",
        "installed",
        time.monotonic() - start,
        session.sent,
        session.verifier,
        report,
        session.resumed,
        payload.describe(),
    )


def send(
    payload: Payload,
    targets: Sequence[Target],
    settings: Settings,
    progress_factory: ProgressFactory = no_progress,
) -> list[Result]:
    """Deploy to every target at once, one thread each; one Result per target, in order.

    With as many `settings.disks` as targets, each target gets the serial in its position;
    otherwise each target picks the one disk of its HELLO whose serial is in the list."""
    if not targets:
        return []
    total = payload.total
    per_target = [settings] * len(targets)
    if len(targets) > 1 and len(settings.disks) == len(targets):
        # One --disk per CODE, in order (like --target).
        per_target = [replace(settings, disks=(disk,)) for disk in settings.disks]
    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        futures = [
            pool.submit(deploy_one, t, payload, s, progress_factory(t.name, total, i))
            for i, (t, s) in enumerate(zip(targets, per_target, strict=True))
        ]
        return [f.result() for f in futures]


def overall_exit(results: Sequence[Result]) -> ExitCode:
    for r in results:
        if not r.ok:
            return ExitCode(r.exit_code)
    return ExitCode.OK

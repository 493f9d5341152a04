"""Resumable HTTP downloads from the pull repository's mirrors (ota.md, "Pull mode").

Standard library only (http.client), so the cron path stays light. Two operations:

* `get_small`: a root, channel or manifest document, conditional on its ETag, with a size
  cap enforced while reading (nothing unsigned is parsed, and nothing unbounded is read).
* `fetch_blob`: a content-addressed blob into the node's BlobStore, resumed from
  store/partial with `Range` + `If-Range`, verified against its sha256 before the rename
  into store/blobs, so blobs/ never holds a byte the signed manifest did not pin.

Failures are sorted three ways, per mirror:
  retry     5xx, 408, 429, timeouts, resets, truncation, too slow: back off and retry
            the same mirror (`attempts` times);
  unusable  404, 403, a bad certificate, too many redirects: the mirror cannot help now,
            go to the next one at once;
  corrupt   the mirror served an object that is not the signed one (wrong size, more
            bytes than signed, sha256 mismatch on a download from byte 0): next mirror,
            and the bytes are discarded.
When every mirror was corrupt the error is a VerificationError (exit 3: never retry
blindly); otherwise TransportError (exit 7), naming every URL and its last reason.

Clocks (docs/ota-security.md): the connection, TLS handshake, status line and headers of a
response must all arrive within `timeout` seconds in total (a watchdog cuts the socket, so
a mirror dripping its headers a byte at a time cannot hold a run); a body must keep
`min_rate` over every window of min(rate_window, timeout). A mirror that wastes `timeout`
seconds of a run that way (stalls, drips) gets no further attempt in that run, so one
hostile mirror costs a run at most about `timeout` seconds, and the OTA lock is released.

Redirects stay on the same scheme (no https -> http, no http -> https: configure the
https URL), and never lead to link-local, multicast or unspecified addresses (the cloud
metadata service at 169.254.169.254), nor to loopback unless the mirror itself is there.
The target's address is checked after connecting, so DNS cannot route around the rule.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from spk_visor import VERSION
from spk_visor.errors import ConfigError, TransportError, VerificationError
from spk_visor.ota import durable
from spk_visor.ota.nodeconf import NodeConfig
from spk_visor.ota.store import BlobStore, hex_of
from spk_visor.trust.verify import BlobCheck

Progress = Callable[[int], None]

CHUNK = 256 * 1024
MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# A server that keeps answering nonsense to our Range requests gets this many fresh
# starts from byte 0 within one attempt before the attempt counts as failed.
MAX_RESTARTS = 2
_BLOB_ID = re.compile(r"sha256:[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_jitter = random.SystemRandom()


@dataclass(frozen=True)
class SmallResult:
    """A small document's answer: 200 with its body, 304 (unchanged) or 404 (absent)."""

    status: int
    body: bytes
    etag: str | None
    url: str


class _Retry(Exception):
    """Transient: back off and ask the same mirror again."""


class _Slow(_Retry):
    """Transient, but the mirror made us wait `wasted` seconds for nothing (a stall, a
    drip): counted against the mirror's patience for this run."""

    def __init__(self, reason: str, wasted: float) -> None:
        super().__init__(reason)
        self.wasted = wasted


class _NextMirror(Exception):
    """This mirror cannot serve the object now; `corrupt` when what it served was wrong."""

    def __init__(self, reason: str, *, corrupt: bool = False) -> None:
        super().__init__(reason)
        self.corrupt = corrupt


class _Restart(Exception):
    """The partial file cannot be continued: discard it and start again from byte 0."""


class _TooLarge(Exception):
    """The body went past the cap."""


class _RateGuard:
    """Fail a transfer whose average rate over `window` seconds falls below `min_rate`.

    The socket timeout only catches a complete stall; a server dripping a byte a second
    would otherwise hold a cron run (and its lock) for days.
    """

    def __init__(self, min_rate: int, window: float) -> None:
        self.min_rate = min_rate
        self.window = window
        self.start = time.monotonic()
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n
        elapsed = time.monotonic() - self.start
        if elapsed < self.window:
            return
        rate = self.count / elapsed
        if rate < self.min_rate:
            raise _Slow(
                f"too slow: {rate / 1024:.1f} KiB/s, below {self.min_rate / 1024:g} KiB/s",
                elapsed,
            )
        self.start = time.monotonic()
        self.count = 0


class _Tracker:
    """Turns "bytes in hand" positions into forward-only progress increments."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.high = 0

    def at(self, pos: int) -> None:
        if pos > self.high:
            if self.progress:
                self.progress(pos - self.high)
            self.high = pos


class _Watchdog:
    """Shuts the connection's socket down when `seconds` pass, so a blocked read returns.

    Socket timeouts bound each read, not the whole: a status line dripped one byte per
    second never trips them. Used around connect + request + response head."""

    def __init__(self, conn: http.client.HTTPConnection, seconds: float) -> None:
        self.conn = conn
        self.seconds = seconds
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        sock = self.conn.sock
        if sock is not None:
            # The plain socket's shutdown, also for an SSLSocket: wakes the reader without
            # touching the TLS object that thread is using.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def _forbidden_address(address: str, mirror_is_loopback: bool) -> str | None:
    """Why a redirect may not lead to `address` (an IP literal), or None."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None  # a host name: checked again once connected
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 is the metadata service too
    if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return "a link-local, multicast or reserved address (e.g. a cloud metadata service)"
    if ip.is_loopback and not mirror_is_loopback:
        return "a loopback address, and the mirror is not on this machine"
    return None


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ConnectionResetError):
        return "connection reset"
    if isinstance(e, http.client.RemoteDisconnected):
        return "connection closed without a response"
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    value = resp.getheader("Content-Length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise _NextMirror(f"invalid Content-Length {value!r}")
    return int(value)


def _check_encoding(resp: http.client.HTTPResponse) -> None:
    # We ask for identity; a gzipping CDN would hand us bytes that fail the signature or
    # hash check, and the operator would chase a tampering that is a misconfiguration.
    encoding = (resp.getheader("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise _NextMirror(
            f"sent Content-Encoding {encoding!r}; the repository must serve raw bytes"
        )


def _strong(etag: str | None) -> bool:
    # If-Range needs a strong validator (RFC 9110 13.1.5); a weak one never matches.
    return bool(etag) and not (etag or "").startswith("W/")


def _reply_etag(resp: http.client.HTTPResponse) -> str | None:
    value = resp.getheader("ETag")
    return value.strip() if value else None


@dataclass
class Fetcher:
    """Downloads from a list of mirrors, in order, each with bounded retries."""

    base_urls: Sequence[str]
    timeout: float = 30.0
    min_rate: int = 16 * 1024
    attempts: int = 4
    backoff: float = 1.0
    user_agent: str = f"spk-visor-ota/{VERSION}"
    rate_window: float = 10.0
    max_backoff: float = 60.0
    # How often a blob download fsyncs its partial file and records the offset in .meta:
    # the bytes a power cut can cost, against an fsync per chunk on slow flash.
    checkpoint_bytes: int = 4 << 20
    checkpoint_s: float = 5.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    # Seconds each mirror made this run wait for nothing (see _Slow).
    _wasted: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_config(cls, config: NodeConfig) -> Fetcher:
        if not config.base_urls:
            raise ConfigError(
                "no update repository configured (base_urls is empty)",
                "set base_urls in /etc/spk-visor/ota.conf",
            )
        return cls(
            base_urls=tuple(config.base_urls),
            attempts=config.fetch_attempts,
            backoff=config.fetch_backoff_s,
            timeout=config.fetch_timeout_s,
        )

    # -- URLs and requests ---------------------------------------------------------------

    def _mirrors(self) -> Sequence[str]:
        if not self.base_urls:
            raise ConfigError("no update repository configured (base_urls is empty)")
        return self.base_urls

    def url(self, base: str, rel: str) -> str:
        if rel.startswith("/") or ".." in rel.split("/") or "?" in rel or "#" in rel:
            raise ValueError(f"not a repository path: {rel!r}")
        return f"{base.rstrip('/')}/v1/{rel}"

    def _connect(self, url: str) -> tuple[http.client.HTTPConnection, str]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _NextMirror(f"unsupported URL {url!r} (http or https only)")
        try:
            port = parts.port
        except ValueError as e:
            raise _NextMirror(f"invalid URL {url!r}: {e}") from None
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                parts.hostname, port, timeout=self.timeout, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(parts.hostname, port, timeout=self.timeout)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return conn, target

    def _request(
        self, url: str, headers: dict[str, str]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """GET `url`, following redirects; the caller closes the connection."""
        headers = {"User-Agent": self.user_agent, "Accept-Encoding": "identity", **headers}
        mirror_is_loopback = _is_loopback(url)
        for hop in range(MAX_REDIRECTS + 1):
            conn, target = self._connect(url)
            watchdog = _Watchdog(conn, self.timeout)
            try:
                with watchdog:
                    conn.connect()
                    if hop:
                        # After DNS: the address actually reached is what the rule is about.
                        peer = str(conn.sock.getpeername()[0])
                        why = _forbidden_address(peer, mirror_is_loopback)
                        if why is not None:
                            raise _NextMirror(f"refusing a redirect to {url}: {peer} is {why}")
                    conn.request("GET", target, headers=headers)
                    resp = conn.getresponse()
            except ssl.SSLCertVerificationError as e:
                conn.close()
                raise _NextMirror(f"TLS certificate rejected: {e.verify_message}") from None
            except _NextMirror:
                conn.close()
                raise
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                if watchdog.fired:
                    raise _Slow(
                        f"timed out: no complete response head within {self.timeout:g} s",
                        self.timeout,
                    ) from None
                if isinstance(e, TimeoutError):
                    raise _Slow(_describe(e), self.timeout) from None
                raise _Retry(_describe(e)) from None
            if watchdog.fired:
                conn.close()
                raise _Slow(
                    f"timed out: no complete response head within {self.timeout:g} s", self.timeout
                )
            location = resp.getheader("Location")
            if resp.status not in REDIRECTS or not location:
                return conn, resp
            conn.close()
            url = self._redirect(url, location, mirror_is_loopback)
        raise _NextMirror(f"more than {MAX_REDIRECTS} redirects")

    @staticmethod
    def _redirect(url: str, location: str, mirror_is_loopback: bool) -> str:
        """The URL a redirect leads to, or _NextMirror (never retried) when refused."""
        target_url = urljoin(url, location.strip())
        parts = urlsplit(target_url)
        scheme = urlsplit(url).scheme
        if parts.scheme != scheme:
            raise _NextMirror(
                f"refusing a redirect from {scheme} to {parts.scheme or 'no scheme'}: "
                f"{target_url[:200]!r} (configure the mirror's final URL in base_urls)"
            )
        if not parts.hostname:
            raise _NextMirror(f"refusing a redirect without a host: {target_url[:200]!r}")
        why = _forbidden_address(parts.hostname, mirror_is_loopback)
        if why is not None:
            raise _NextMirror(f"refusing a redirect to {target_url[:200]}: {why}")
        return target_url

    def _read(
        self,
        resp: http.client.HTTPResponse,
        limit: int,
        guard: _RateGuard,
    ) -> Iterator[bytes]:
        """The body in chunks; _TooLarge past `limit` bytes, _Retry when cut short."""
        expected = _content_length(resp)
        got = 0
        while True:
            try:
                chunk = resp.read1(CHUNK)
            except TimeoutError:
                raise _Slow(f"timed out after {got} bytes", self.timeout) from None
            except (OSError, http.client.HTTPException) as e:
                raise _Retry(f"{_describe(e)} after {got} bytes") from None
            if not chunk:
                break
            got += len(chunk)
            if got > limit:
                raise _TooLarge
            yield chunk
            guard.add(len(chunk))
        if expected is not None and got < expected:
            raise _Retry(f"connection closed after {got} of {expected} bytes")

    def _rate_guard(self) -> _RateGuard:
        return _RateGuard(self.min_rate, min(self.rate_window, self.timeout))

    def _patience_left(self, base: str) -> bool:
        return self._wasted.get(base, 0.0) < self.timeout

    def _waste(self, base: str, e: _Retry) -> str:
        """Count a slow failure against `base`; the reason, noting an exhausted mirror."""
        if isinstance(e, _Slow):
            self._wasted[base] = self._wasted.get(base, 0.0) + e.wasted
            if not self._patience_left(base):
                return f"{e} (no more attempts this run: the mirror stalls or drips)"
        return str(e)

    def _pause(self, attempt: int) -> None:
        """Exponential backoff with jitter, so a fleet does not retry in lockstep."""
        delay = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
        self.sleep(delay * _jitter.uniform(0.5, 1.5))

    # -- small documents -----------------------------------------------------------------

    def get_small(self, rel: str, cap: int, etag: str | None = None) -> SmallResult:
        """GET a root, channel or manifest document of at most `cap` bytes.

        200, 304 (with `etag`) and 404 are answers; the first mirror that answers is
        authoritative, so a stale mirror is never consulted after a reachable one.
        """
        failures: list[str] = []
        for base in self._mirrors():
            url = self.url(base, rel)
            reason = "no attempt (the mirror stalled earlier in this run)"
            for attempt in range(self.attempts):
                if not self._patience_left(base):
                    break
                if attempt:
                    self._pause(attempt)
                try:
                    return self._get_small_once(url, cap, etag)
                except _Retry as e:
                    reason = self._waste(base, e)
                except _NextMirror as e:
                    reason = str(e)
                    break
            failures.append(f"{url}: {reason}")
        raise TransportError(
            f"could not fetch {rel} from any mirror: " + "; ".join(failures),
            "transient: the next run retries; check base_urls in ota.conf and the mirrors",
        )

    def _get_small_once(self, url: str, cap: int, etag: str | None) -> SmallResult:
        headers = {"If-None-Match": etag} if etag else {}
        conn, resp = self._request(url, headers)
        try:
            if resp.status == 304:
                if not etag:
                    raise _NextMirror("304 to a request that was not conditional")
                return SmallResult(304, b"", _reply_etag(resp) or etag, url)
            if resp.status in (404, 410):
                return SmallResult(404, b"", None, url)
            if resp.status in RETRY_STATUS:
                raise _Retry(f"HTTP {resp.status} {resp.reason}")
            if resp.status != 200:
                raise _NextMirror(f"HTTP {resp.status} {resp.reason}")
            _check_encoding(resp)
            length = _content_length(resp)
            too_large = VerificationError(
                f"{url} is larger than {cap} bytes",
                "a repository document over its size cap is refused unread",
            )
            if length is not None and length > cap:
                raise too_large
            try:
                body = b"".join(self._read(resp, cap, self._rate_guard()))
            except _TooLarge:
                raise too_large from None
            return SmallResult(200, body, _reply_etag(resp), url)
        finally:
            conn.close()

    # -- blobs ---------------------------------------------------------------------------

    def fetch_blob(
        self, blob_id: str, size: int, store: BlobStore, progress: Progress | None = None
    ) -> Path:
        """Download blob `blob_id` of `size` bytes into `store`, resuming a partial one.

        `progress` receives increments of the bytes in hand (a resumed prefix counts at
        once); it only ever moves forward, so after a restart from byte 0 it stays put
        until the new download passes the old high-water mark, and the increments sum to
        `size` on success.
        """
        if not _BLOB_ID.fullmatch(blob_id) or size < 0:
            raise ValueError(f"not a blob id and size: {blob_id!r}, {size}")
        if store.has(blob_id, size):
            return store.path(blob_id)
        store.ensure()
        tracker = _Tracker(progress)
        rel = f"blobs/sha256/{hex_of(blob_id)}"
        failures: list[str] = []
        corrupt = 0
        for base in self._mirrors():
            url = self.url(base, rel)
            reason = "no attempt (the mirror stalled earlier in this run)"
            for attempt in range(self.attempts):
                if not self._patience_left(base):
                    break
                if attempt:
                    self._pause(attempt)
                try:
                    return self._attempt(url, blob_id, size, store, tracker)
                except _Retry as e:
                    reason = self._waste(base, e)
                except _NextMirror as e:
                    reason = str(e)
                    if e.corrupt:
                        corrupt += 1
                        _discard(store, blob_id)
                    break
            failures.append(f"{url}: {reason}")
        detail = "; ".join(failures)
        if failures and corrupt == len(failures):
            raise VerificationError(
                f"every mirror served a blob {blob_id[:19]}… that is not the signed one: {detail}",
                "the repository is corrupt or tampered with; nothing was installed",
            )
        raise TransportError(
            f"could not fetch blob {blob_id[:19]}… from any mirror: {detail}",
            "transient: the next run resumes the download; check the mirrors",
        )

    def _attempt(
        self, url: str, blob_id: str, size: int, store: BlobStore, tracker: _Tracker
    ) -> Path:
        reason = ""
        for _ in range(MAX_RESTARTS + 1):
            try:
                return self._transfer(url, blob_id, size, store, tracker)
            except _Restart as e:
                reason = str(e)
                _discard(store, blob_id)
        raise _Retry(f"{reason} (restarted {MAX_RESTARTS} times)")

    def _transfer(
        self, url: str, blob_id: str, size: int, store: BlobStore, tracker: _Tracker
    ) -> Path:
        offset, etag, from_url = _resume_point(store, blob_id, size)
        if offset == size:
            # The previous run had every byte but stopped before the rename.
            return self._write(store, blob_id, size, offset, None, url, None, tracker)
        headers: dict[str, str] = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            # An ETag only means something to the server that issued it; on another
            # mirror the blob's name (its hash) is the validator, and the final sha256
            # check catches a prefix that was not the same object.
            if from_url == url and etag and _strong(etag):
                headers["If-Range"] = etag
        conn, resp = self._request(url, headers)
        try:
            start = self._start_of(resp, offset, size)
            # A 206 without an ETag continues the same object: keep the validator we had.
            new_etag = _reply_etag(resp) or (etag if start else None)
            return self._write(store, blob_id, size, start, resp, url, new_etag, tracker)
        finally:
            conn.close()

    def _write(
        self,
        store: BlobStore,
        blob_id: str,
        size: int,
        start: int,
        resp: http.client.HTTPResponse | None,
        url: str,
        etag: str | None,
        tracker: _Tracker,
    ) -> Path:
        """Keep the first `start` bytes of the partial file, append the body, verify."""
        # Opened only once a usable response is here, so a refused connection leaves the
        # partial state exactly as it was.
        fd = os.open(store.partial(blob_id), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, start)
            check = BlobCheck(blob_id, size)
            _hash_prefix(fd, start, check)
            tracker.at(start)
            if resp is not None:
                os.lseek(fd, start, os.SEEK_SET)
                _write_meta(store, blob_id, size, start, etag, url)
                self._receive(resp, fd, check, start, size, store, blob_id, etag, url, tracker)
            return _finish(store, blob_id, fd, check, resumed=start > 0)
        finally:
            os.close(fd)

    def _start_of(self, resp: http.client.HTTPResponse, offset: int, size: int) -> int:
        """Where the response body starts in the blob, or why it cannot be used."""
        status = resp.status
        if status == 206:
            content_range = (resp.getheader("Content-Range") or "").strip()
            m = _CONTENT_RANGE.fullmatch(content_range)
            want = (offset, size - 1, size)
            if not offset or not m or tuple(int(g) for g in m.groups()) != want:
                raise _Restart(f"206 with Content-Range {content_range!r} to bytes={offset}-")
            # A Content-Length that disagrees needs no check of its own: a short body is
            # resumed, a long one trips the read limit (more than the signed size).
            _check_encoding(resp)
            return offset
        if status == 200:
            # Either a fresh download, or the server ignored Range / the object changed
            # (If-Range did not match): the body is the whole object from byte 0.
            length = _content_length(resp)
            if length is not None and length != size:
                raise _NextMirror(f"object is {length} bytes, signed size is {size}", corrupt=True)
            _check_encoding(resp)
            return 0
        if status == 416:
            raise _Restart("416 Range Not Satisfiable")
        if status in RETRY_STATUS:
            raise _Retry(f"HTTP {status} {resp.reason}")
        raise _NextMirror(f"HTTP {status} {resp.reason}")

    def _receive(
        self,
        resp: http.client.HTTPResponse,
        fd: int,
        check: BlobCheck,
        start: int,
        size: int,
        store: BlobStore,
        blob_id: str,
        etag: str | None,
        url: str,
        tracker: _Tracker,
    ) -> None:
        pos = start
        synced_at, synced_t = pos, time.monotonic()
        try:
            for chunk in self._read(resp, size - start, self._rate_guard()):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                check.update(chunk)
                pos += len(chunk)
                tracker.at(pos)
                if (
                    pos - synced_at >= self.checkpoint_bytes
                    or time.monotonic() - synced_t >= self.checkpoint_s
                ):
                    _checkpoint(store, blob_id, fd, size, pos, etag, url)
                    synced_at, synced_t = pos, time.monotonic()
        except (_TooLarge, VerificationError):
            raise _NextMirror(f"sent more than the signed {size} bytes", corrupt=True) from None
        except _Retry:
            # Keep what arrived, durably, so the next attempt (or the next cron run after
            # a power cut) continues from here.
            if pos > synced_at:
                _checkpoint(store, blob_id, fd, size, pos, etag, url)
            raise
        if pos < size:
            _checkpoint(store, blob_id, fd, size, pos, etag, url)
            raise _Retry(f"body ended after {pos} of {size} bytes")


def _meta_path(store: BlobStore, blob_id: str) -> Path:
    return store.partial(blob_id).with_suffix(".meta")


def _write_meta(
    store: BlobStore, blob_id: str, size: int, offset: int, etag: str | None, url: str
) -> None:
    meta = {"blob": blob_id, "size": size, "offset": offset, "etag": etag, "url": url}
    durable.write_json(_meta_path(store, blob_id), meta)


def _checkpoint(
    store: BlobStore, blob_id: str, fd: int, size: int, pos: int, etag: str | None, url: str
) -> None:
    # Data first, then the record that vouches for it: .meta never claims unsynced bytes.
    os.fsync(fd)
    _write_meta(store, blob_id, size, pos, etag, url)


def _resume_point(store: BlobStore, blob_id: str, size: int) -> tuple[int, str | None, str]:
    """(offset, etag, url) to continue from; (0, None, "") when nothing can be trusted.

    The offset is the one .meta recorded, which was fsynced before it was written; file
    bytes past it may be garbage after a power cut and are cut off.
    """
    part = store.partial(blob_id)
    try:
        on_disk = part.stat().st_size
        meta: Any = json.loads(_meta_path(store, blob_id).read_bytes())
        offset, etag, url = meta["offset"], meta["etag"], meta["url"]
        valid = (
            meta["blob"] == blob_id
            and meta["size"] == size
            and isinstance(offset, int)
            and 0 <= offset <= min(size, on_disk)
            and (etag is None or isinstance(etag, str))
            and isinstance(url, str)
        )
    except (OSError, ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        _discard(store, blob_id)
        return 0, None, ""
    return offset, etag, url


def _hash_prefix(fd: int, length: int, check: BlobCheck) -> None:
    # Re-reading the kept prefix is simpler and safer than persisting hash state, and
    # costs one read of what is already on disk.
    pos = 0
    while pos < length:
        chunk = os.pread(fd, min(1 << 20, length - pos), pos)
        if not chunk:
            raise _Restart("partial file shorter than recorded")
        check.update(chunk)
        pos += len(chunk)


def _finish(store: BlobStore, blob_id: str, fd: int, check: BlobCheck, *, resumed: bool) -> Path:
    try:
        check.finish()  # the size is right (_receive retries a short body): the hash
    except VerificationError:
        actual = check.hexdigest()
        if resumed:
            # The kept prefix may be what is wrong (another mirror, a bad disk write):
            # one clean download from byte 0 decides.
            raise _Restart(f"sha256 mismatch after resuming (got {actual[:12]}…)") from None
        raise _NextMirror(f"sha256 mismatch (got {actual[:12]}…)", corrupt=True) from None
    os.fsync(fd)
    path = store.promote(blob_id)
    with contextlib.suppress(FileNotFoundError):
        _meta_path(store, blob_id).unlink()
    return path


def _discard(store: BlobStore, blob_id: str) -> None:
    for path in (store.partial(blob_id), _meta_path(store, blob_id)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

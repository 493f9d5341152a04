"""Typed client of the smechvisord API over a Transport.

Every method returns the daemon's JSON document (so `--json` can print it as is) or raises
a SpkVisorError: DaemonError for the daemon's error envelope, AuthError for a missing or
wrong token (naming where the token was looked for), ProtocolError for an answer that is
not smechvisord's.
"""

from __future__ import annotations

import json
from typing import Any, cast
from urllib.parse import quote

from smechvisord import protocol as p
from spk_visor.config import NODE_TOKEN_FILE, Target
from spk_visor.errors import (
    WRONG_SERVICE_HINT,
    AuthError,
    DaemonError,
    ProtocolError,
    register_secret,
)
from spk_visor.transport.base import Transport

JsonDoc = dict[str, Any]


class Client:
    def __init__(self, transport: Transport, target: Target, token: str | None) -> None:
        self.transport = transport
        self.target = target
        self.token = token
        register_secret(token)

    # ---- plumbing ------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        body: JsonDoc | None = None,
        timeout: float | None = None,
        auth: bool = True,
    ) -> Any:
        headers: dict[str, str] = {"Accept": "application/json"}
        if auth:
            if not self.token:
                # Say "not running" rather than "no token" when both are true: the first
                # is what the operator has to fix first.
                self.health()
                raise self._auth_error("no API token found")
            headers["Authorization"] = f"{p.AUTH_SCHEME} {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        resp = self.transport.request(method, path, data, headers, timeout)
        doc = self._decode(resp.status, resp.content_type, resp.body, path)
        if resp.status >= 400:
            err = doc.get("error") if isinstance(doc, dict) else None
            if not isinstance(err, dict) or "code" not in err:
                raise ProtocolError(
                    f"{self.transport.address}{path}: HTTP {resp.status} "
                    "without smechvisord's error document"
                )
            code = str(err["code"])
            if code in (p.ERR_UNAUTHORIZED, p.ERR_FORBIDDEN):
                if code == p.ERR_FORBIDDEN:
                    raise self._auth_error("the node refused the token", refused=True)
                raise self._auth_error("the node asked for a token")
            raise DaemonError(
                resp.status,
                code,
                str(err.get("message", "")),
                dict(err.get("details") or {}),
                self.transport.address,
            )
        return doc

    def _decode(self, status: int, ctype: str, body: bytes, path: str) -> Any:
        if not ctype.startswith("application/json"):
            raise ProtocolError(
                f"{self.transport.address}{path} answered HTTP {status} with "
                f"{ctype or 'no content type'}, not smechvisord's JSON",
                WRONG_SERVICE_HINT,
            )
        try:
            return json.loads(body)
        except ValueError as e:
            raise ProtocolError(f"{self.transport.address}{path}: invalid JSON: {e}") from e

    def _auth_error(self, what: str, refused: bool = False) -> AuthError:
        where = ", ".join(self.target.token_sources) or "--token, SPK_VISOR_TOKEN"
        on_node = self.target.remote_token_file if self.target.ssh else NODE_TOKEN_FILE
        hint = f"pass --token or set SPK_VISOR_TOKEN; on the node the token is in {on_node}"
        if refused:
            # A token was given, and it is not this node's: passing one is not the fix.
            hint = f"it is not this node's token: copy it again from {on_node} on the node"
        return AuthError(f"{self.transport.address}: {what} (token looked for in: {where})", hint)

    def _object(self, doc: Any, path: str, required: str) -> JsonDoc:
        """`doc` if it is a JSON object holding `required`, else the answer of some other
        service: a ProtocolError that says so, not an AttributeError (exit 1) later."""
        if not isinstance(doc, dict) or required not in doc:
            raise self._not_ours(path, f'a JSON object with "{required}"')
        return doc

    def _objects(self, doc: Any, path: str) -> list[JsonDoc]:
        if not isinstance(doc, list) or not all(isinstance(item, dict) for item in doc):
            raise self._not_ours(path, "a list of JSON objects")
        return doc

    def _not_ours(self, path: str, expected: str) -> ProtocolError:
        return ProtocolError(
            f"{self.transport.address}{path} answered JSON that is not smechvisord's "
            f"(expected {expected})",
            WRONG_SERVICE_HINT,
        )

    @staticmethod
    def _vm_path(vm_id: str, suffix: str = "") -> str:
        return f"{p.PATH_VMS}/{quote(vm_id, safe='')}{suffix}"

    # ---- API -------------------------------------------------------------------------

    def health(self) -> JsonDoc:
        doc = cast(JsonDoc, self.call("GET", p.PATH_HEALTH, auth=False))
        if not isinstance(doc, dict) or doc.get("status") != "ok":
            raise ProtocolError(f"{self.transport.address}: unexpected health answer {doc!r}")
        return doc

    def node(self) -> JsonDoc:
        return self._object(self.call("GET", p.PATH_NODE), p.PATH_NODE, "cpu_model")

    def vms(self) -> list[JsonDoc]:
        return self._objects(self.call("GET", p.PATH_VMS), p.PATH_VMS)

    def vm(self, vm_id: str) -> JsonDoc:
        path = self._vm_path(vm_id)
        return self._object(self.call("GET", path), path, "id")

    def create_vm(
        self,
        *,
        cpus: int,
        memory_mb: int,
        disk: str,
        name: str | None = None,
        dry_run: bool = False,
        wait: float | None = None,
    ) -> JsonDoc:
        body: JsonDoc = {p.KEY_CPUS: cpus, p.KEY_MEMORY_MB: memory_mb, p.KEY_DISK: disk}
        if name:
            body[p.KEY_NAME] = name
        if dry_run:
            body[p.KEY_DRY_RUN] = True
        # `wait`: a create answers only once the VMM is up, which can outlast --timeout.
        return self._object(self.call("POST", p.PATH_VMS, body, timeout=wait), p.PATH_VMS, "id")

    def vm_action(
        self, vm_id: str, action: str, timeout_seconds: int | None = None, wait: float | None = None
    ) -> JsonDoc:
        body: JsonDoc | None = None
        if timeout_seconds is not None:
            body = {p.KEY_TIMEOUT: timeout_seconds}
        path = self._vm_path(vm_id, f"/{action}")
        return self._object(self.call("POST", path, body, timeout=wait), path, "id")

    def delete_vm(self, vm_id: str) -> JsonDoc:
        path = self._vm_path(vm_id)
        return self._object(self.call("DELETE", path), path, "deleted")

    def console(
        self, vm_id: str, offset: int | None = None, max_bytes: int | None = None
    ) -> JsonDoc:
        query = []
        if offset is not None:
            query.append(f"offset={offset}")
        if max_bytes is not None:
            query.append(f"max_bytes={max_bytes}")
        path = self._vm_path(vm_id, "/console")
        return self._object(
            self.call("GET", path + ("?" + "&".join(query) if query else "")), path, "data"
        )

    def images(self) -> list[JsonDoc]:
        return self._objects(self.call("GET", p.PATH_IMAGES), p.PATH_IMAGES)

    def iommu(self) -> JsonDoc:
        return self._object(self.call("GET", p.PATH_IOMMU), p.PATH_IOMMU, "ready")

    def pci(self) -> list[JsonDoc]:
        return self._objects(self.call("GET", p.PATH_PCI), p.PATH_PCI)

    def vfio_status(self) -> JsonDoc:
        return self._object(self.call("GET", p.PATH_VFIO), p.PATH_VFIO, "loaded")

    def set_vfio(self, enable: bool) -> JsonDoc:
        return self._object(
            self.call("POST", p.PATH_VFIO, {p.KEY_ENABLE: enable}), p.PATH_VFIO, "enabled"
        )

    def reboot_support(self) -> JsonDoc:
        return self._object(self.call("GET", p.PATH_REBOOT_UEFI), p.PATH_REBOOT_UEFI, "supported")

    def reboot_uefi(self, timeout_seconds: int | None = None, wait: float | None = None) -> JsonDoc:
        body: JsonDoc = {p.KEY_CONFIRM: True}
        if timeout_seconds is not None:
            body[p.KEY_TIMEOUT] = timeout_seconds
        doc = self.call("POST", p.PATH_REBOOT_UEFI, body, timeout=wait)
        return self._object(doc, p.PATH_REBOOT_UEFI, "rebooting")

    def close(self) -> None:
        self.transport.close()

"""The daemon's API contract: paths, JSON keys, error codes and limits.

This module is shared by the daemon and by ``spk_visor.client`` (which imports it), so it
holds names and numbers only: no I/O, no imports outside the standard library.
"""

from __future__ import annotations

import re
from typing import Final

API_PREFIX: Final = "/api"

# Routes. `{id}` is a VM id (see VM_ID_RE).
PATH_HEALTH: Final = "/api/health"
PATH_NODE: Final = "/api/node"
PATH_VMS: Final = "/api/vms"
PATH_VM: Final = "/api/vms/{id}"
PATH_VM_ACTION: Final = "/api/vms/{id}/{action}"
PATH_VM_CONSOLE: Final = "/api/vms/{id}/console"
PATH_IMAGES: Final = "/api/images"
PATH_IOMMU: Final = "/api/iommu"
PATH_VFIO: Final = "/api/vfio"
PATH_PCI: Final = "/api/pci"
PATH_REBOOT_UEFI: Final = "/api/reboot-uefi"

# POST /api/vms/{id}/<action>
VM_ACTIONS: Final = ("start", "shutdown", "stop", "reboot", "pause", "resume")

# VM states. `starting` only exists between the record and the VMM's first ping.
STATE_STARTING: Final = "starting"
STATE_RUNNING: Final = "running"
STATE_PAUSED: Final = "paused"
STATE_STOPPED: Final = "stopped"
STATE_FAILED: Final = "failed"
VM_STATES: Final = (STATE_STARTING, STATE_RUNNING, STATE_PAUSED, STATE_STOPPED, STATE_FAILED)
LIVE_STATES: Final = (STATE_STARTING, STATE_RUNNING, STATE_PAUSED)
# Not a VM state: a record.json the daemon cannot read is listed with this state (and a
# `broken` reason) until someone fixes or removes it; it is never started or deleted.
STATE_BROKEN: Final = "broken"

# A VM name becomes its id, a file name and part of a socket path: keep it tame.
VM_ID_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
# The id a VMM the daemon did not start is listed under (its PID); no VM may be named so.
UNMANAGED_ID_RE: Final = re.compile(r"pid-[0-9]{1,10}")

# Request body keys.
KEY_CPUS: Final = "cpus"
KEY_MEMORY_MB: Final = "memory_mb"
KEY_DISK: Final = "disk"
KEY_NAME: Final = "name"
KEY_DRY_RUN: Final = "dry_run"
KEY_ENABLE: Final = "enable"
KEY_CONFIRM: Final = "confirm"
KEY_TIMEOUT: Final = "timeout_seconds"

# Limits the daemon enforces and clients may pre-check.
MAX_BODY_BYTES: Final = 64 * 1024
MIN_MEMORY_MB: Final = 128
MAX_SHUTDOWN_TIMEOUT: Final = 3600
DEFAULT_SHUTDOWN_TIMEOUT: Final = 30
MAX_CONSOLE_BYTES: Final = 256 * 1024

# Error codes: {"error": {"code": <one of these>, "message": "...", "details": {...}}}
ERR_INVALID_REQUEST: Final = "invalid_request"  # 400: a field is wrong; details.field names it
ERR_INVALID_JSON: Final = "invalid_json"  # 400: the body is not a JSON object
ERR_LENGTH_REQUIRED: Final = "length_required"  # 411
ERR_UNAUTHORIZED: Final = "unauthorized"  # 401: no bearer token
ERR_FORBIDDEN: Final = "forbidden"  # 403: wrong token
ERR_NOT_FOUND: Final = "not_found"  # 404
ERR_METHOD_NOT_ALLOWED: Final = "method_not_allowed"  # 405
ERR_CONFLICT: Final = "conflict"  # 409: the VM's state does not allow this
ERR_IOMMU_NOT_READY: Final = "iommu_not_ready"  # 409: details.blockers
ERR_UNSUPPORTED: Final = "unsupported"  # 409: this node cannot do it (firmware, ...)
ERR_REQUEST_TIMEOUT: Final = "request_timeout"  # 408: part of a request came, then nothing
ERR_PAYLOAD_TOO_LARGE: Final = "payload_too_large"  # 413
ERR_UNSUPPORTED_MEDIA_TYPE: Final = "unsupported_media_type"  # 415
ERR_VMM_UNAVAILABLE: Final = "vmm_unavailable"  # 503: cloud-hypervisor is not installed
ERR_KVM_UNAVAILABLE: Final = "kvm_unavailable"  # 503: /dev/kvm missing or unusable
ERR_FIRMWARE_MISSING: Final = "firmware_missing"  # 503: SMECHVISORD_FIRMWARE not found
ERR_VMM_FAILED: Final = "vmm_failed"  # 502: the VMM ran and failed; details.stderr_tail
ERR_BUSY: Final = "busy"  # 503: connection cap reached, or the VM is mid-action
ERR_COMMAND_FAILED: Final = "command_failed"  # 500: modprobe/reboot command failed
ERR_INTERNAL: Final = "internal_error"  # 500
# 400: plain HTTP from a non-loopback address; the message names the https:// URL.
ERR_TLS_REQUIRED: Final = "tls_required"
ERR_NOT_IMPLEMENTED: Final = "not_implemented"  # 501/505: a Transfer-Encoding, HTTP/2
# 507: the state dir is full. details.vm (when present) is what really happened to the VM;
# its record is saved once space returns.
ERR_INSUFFICIENT_STORAGE: Final = "insufficient_storage"

AUTH_SCHEME: Final = "Bearer"

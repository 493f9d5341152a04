"""The key sets of the daemon's JSON documents, as the tests pin them (one place, so a
change of the API contract is one edit here, and every test that checks shapes follows)."""

from __future__ import annotations

# GET /api/node: the product's documented keys, then those smechvisord adds.
DOCUMENTED_NODE_KEYS = {
    "cpu_model",
    "cpu_cores",
    "memory_total_mb",
    "memory_used_mb",
    "uptime_seconds",
    "kvm_available",
}
# What host.py's node_facts() gives (the host part of GET /api/node).
HOST_KEYS = DOCUMENTED_NODE_KEYS | {
    "cpu_threads",
    "hostname",
    "kernel",
    "load_average",
    "boot_mode",
}
NODE_KEYS = {
    "cpu_model",
    "cpu_cores",
    "cpu_threads",
    "kvm_available",
    "hostname",
    "kernel",
    "boot_mode",
    "vmm",
    "iommu_ready",
    "vfio_loaded",
    "capabilities",
    "capability_reasons",
    "memory_total_mb",
    "memory_used_mb",
    "uptime_seconds",
    "load_average",
    "vms_running",
    "daemon_version",
    "image_dirs",
}
VMM_KEYS = {"bin", "path", "available", "version", "firmware", "firmware_present"}
CAPABILITY_KEYS = {"create_vm", "vfio", "reboot_uefi"}
VM_KEYS = {
    "id",
    "name",
    "uuid",
    "managed",
    "state",
    "pid",
    "cpus",
    "memory_mb",
    "disk",
    "cpu_percent",
    "rss_mb",
    "created_at",
    "started_at",
    "exit",
    "last_shutdown",
    "api_socket",
    "serial_log",
}
UNMANAGED_VM_KEYS = {
    "id",
    "name",
    "managed",
    "state",
    "pid",
    "cpus",
    "memory_mb",
    "disk",
    "cpu_percent",
    "rss_mb",
    "api_socket",
}
EXIT_KEYS = {"code", "signal", "at", "reason", "log_tail"}
SHUTDOWN_KEYS = {"graceful", "steps", "seconds"}
STEP_KEYS = {"step", "at", "result", "exited"}
DRY_RUN_KEYS = {"dry_run", "id", "argv", "problems"}
CONSOLE_KEYS = {"id", "offset", "next_offset", "size", "data", "state"}
IOMMU_KEYS = {
    "ready",
    "blockers",
    "checks",
    "cpu_virtualization",
    "iommu_groups",
    "cmdline_flags",
    "iommu_passthrough",
}
CHECK_KEYS = {"id", "ok", "label", "detail", "fix"}
PCI_KEYS = {
    "address",
    "vendor_id",
    "device_id",
    "class_id",
    "class_name",
    "driver",
    "iommu_group",
    "group_devices",
    "host_critical",
    "viable",
    "reasons",
}
VFIO_STATUS_KEYS = {"loaded", "ready", "blockers"}
VFIO_CHANGE_KEYS = {"enabled", "command", "output", "loaded"}
REBOOT_KEYS = {"rebooting", "os_indications", "vms"}

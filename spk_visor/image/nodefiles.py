"""The text of the files the builder writes into the image (besides the packaged ones).

The image is read-only and identical on every node; what belongs to one node lives on
the data partition (design: image.md, "What the image is"). `spk-visor-data`, the first
OpenRC service after the kernel file systems, mounts it and points the per-node paths at
it; the links below (`NODE_LINKS`) are the other half of that contract.
"""

from __future__ import annotations

DATA = "/data"

# Paths in the image that are links into the data partition, and what they point to.
NODE_LINKS = {
    "etc/hostname": f"{DATA}/etc/hostname",
    "etc/machine-id": f"{DATA}/etc/machine-id",
    "etc/spk-deploy.json": f"{DATA}/etc/spk-deploy.json",
    "etc/smechvisord": f"{DATA}/etc/smechvisord",
    "etc/spk-visor/ota.conf": f"{DATA}/etc/spk-visor/ota.conf",
    # `touch /etc/spk-visor/inhibit` stops this node's pulls across reboots (ota pull).
    "etc/spk-visor/inhibit": f"{DATA}/etc/spk-visor/inhibit",
    # dhclient and an operator's static settings write here at run time.
    "etc/resolv.conf": "/run/resolv.conf",
    "var/tmp": "/tmp",  # noqa: S108 (the node's own /tmp, a tmpfs)
}

# The early service: data partition, fstab, per-node files. POSIX sh, util-linux only.
DATA_SERVICE = r"""#!/sbin/openrc-run
# spk-visor-data: mount the node's data partition at /data and point the per-node files
# at it (written by spk-visor image build). The root is read-only and the same on every
# node; hostname, SSH host keys, authorized keys, machine-id, the daemon's token, ota.conf,
# GRUB's files, the daemon releases and /var/lib live on the partition named "data" on the
# disk that holds the root. Without one (a bare slot booted for a test) they go to a tmpfs
# and last until shutdown.

description="SmechVisor: mount the data partition and point per-node files at it"

depend() {
	after mountkernfs udev
	before checkfs mountall localmount hostname networking ssh spk-visor-ota smechvisord
}

_data_partition() {
	root=$(findmnt -n -o SOURCE /) || return 1
	disk=$(lsblk -n -d -o PKNAME "$root" 2>/dev/null)
	[ -n "$disk" ] || return 1
	lsblk -l -n -p -o NAME,PARTLABEL "/dev/$disk" | awk '$2 == "data" { print $1; exit }'
}

_first_boot_files() {
	mkdir -p /data/etc/ssh/authorized_keys /data/etc/spk-visor /data/etc/network/interfaces.d \
		/data/var/log /data/var/lib /data/boot/efi /data/opt/smechvisord
	mkdir -p -m 0700 /data/etc/smechvisord
	[ -s /data/etc/hostname ] || echo smechvisor > /data/etc/hostname
	if [ ! -s /data/etc/machine-id ]; then
		tr -d '-' < /proc/sys/kernel/random/uuid > /data/etc/machine-id
	fi
	conf=/data/etc/spk-visor/ota.conf
	[ -e "$conf" ] || cp /usr/share/spk-visor/ota.conf "$conf"
	# Host keys are made here, once per node: the image carries none.
	ssh-keygen -A -f /data >/dev/null 2>&1 || ewarn "ssh-keygen -A failed: sshd will not start"
}

_dhcp_everywhere() {
	# No site network settings on /data: DHCP on every wired NIC the kernel found.
	mkdir -p /run/network/spk-visor
	: > /run/network/spk-visor/dhcp
	ls /data/etc/network/interfaces.d/* >/dev/null 2>&1 && return 0
	for dev in /sys/class/net/*; do
		name=${dev##*/}
		[ -e "$dev/device" ] && [ "$(cat "$dev/type")" = 1 ] || continue
		printf 'allow-hotplug %s\niface %s inet dhcp\n\n' "$name" "$name" \
			>> /run/network/spk-visor/dhcp
	done
}

start() {
	# /tmp first: checkroot-bootclean.sh cleans it before mountall.sh mounts fstab's
	# tmpfs there, and fails on the read-only root (holding back mountall).
	mountpoint -q /tmp || mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
	ebegin "Mounting the data partition"
	part=$(_data_partition)
	if [ -n "$part" ]; then
		if ! mount -o nodev,nosuid "$part" /data; then
			eend 1 "cannot mount $part at /data"
			return 1
		fi
	else
		ewarn "no partition named data next to the root: node files are kept in RAM"
		mount -t tmpfs -o mode=0755,nodev,nosuid spk-data /data || { eend 1; return 1; }
	fi
	_first_boot_files
	if [ -s /data/etc/fstab ]; then
		# The installer's fstab (deploy): /data itself is mounted already and skipped.
		mount -a -T /data/etc/fstab || ewarn "some entries of /data/etc/fstab did not mount"
	else
		mount --bind /data/var/lib /var/lib
	fi
	mount --bind /data/var/log /var/log
	mkdir -p /var/lib/dhcp /var/lib/spk-visor /var/lib/smechvisord
	_dhcp_everywhere
	eend 0
}
"""

# Debian's dhclient-script replaces /etc/resolv.conf with mv, which a read-only root
# refuses; the hook writes the link's target in /run instead (dhclient-script(8)).
DHCLIENT_HOOK = """\
# spk-visor: /etc/resolv.conf is a link to /run/resolv.conf on a read-only root.
make_resolv_conf() {
    if [ -n "$new_domain_name_servers" ]; then
        {
            [ -n "$new_domain_name" ] && echo "search $new_domain_name"
            for ns in $new_domain_name_servers; do echo "nameserver $ns"; done
        } > /run/resolv.conf.new && mv -f /run/resolv.conf.new /run/resolv.conf
    fi
}
"""

NETWORK_INTERFACES = """\
# SmechVisor: site settings go in /data/etc/network/interfaces.d/ (one file per NIC);
# without any, spk-visor-data sets up DHCP on every wired NIC.
auto lo
iface lo inet loopback

source /data/etc/network/interfaces.d/*
source /run/network/spk-visor/dhcp
"""

FSTAB = """\
# SmechVisor base image. The root is read-only (ro on the kernel line) and carries no
# node data: the node's partition "data" is mounted at /data by the spk-visor-data
# service, which then applies /data/etc/fstab (written by spk-visor deploy).
# The root line only keeps checkroot.sh from remounting the slot read-write (its default);
# the kernel line names the real device (root=PARTUUID=...), and pass 0 skips fsck.
/dev/root / ext4 ro,noatime 0 0
tmpfs /tmp tmpfs nosuid,nodev,mode=1777 0 0
"""

SSHD_CONFIG = """\
# SmechVisor: host keys and authorized keys live on the data partition (one per node).
HostKey /data/etc/ssh/ssh_host_ed25519_key
HostKey /data/etc/ssh/ssh_host_ecdsa_key
HostKey /data/etc/ssh/ssh_host_rsa_key
AuthorizedKeysFile /data/etc/ssh/authorized_keys/%u
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
"""

OTA_CONF = """\
# /etc/spk-visor/ota.conf: this node's OTA settings (a link to /data/etc/spk-visor/ota.conf,
# copied from /usr/share/spk-visor/ota.conf at first boot). Every key is optional; the
# values shown are the defaults. See spk-visor(1), FILES, and docs/ota.md.

#channel = "stable"
#base_urls = ["https://updates.example.net/smechvisor"]
#allow_channel_revert = true
#apply_daemon = true
#stage_base = false
#service = "smechvisord"
#health_url = "http://127.0.0.1:8080/api/health"

# The A/B slots as spk-visor deploy lays out the disk (GPT names root-a, root-b) and
# GRUB's environment on the data partition (bind-mounted at /boot).
[slots]
a = "/dev/disk/by-partlabel/root-a"
b = "/dev/disk/by-partlabel/root-b"
grubenv = "/boot/grub/grubenv"
"""

# The node pulls its own updates (Debian's cron, started by OpenRC in the default runlevel).
# The schedule is the same on every node; whether a node pulls, and from where, is its
# ota.conf on the data partition: without base_urls the pull does nothing and prints
# nothing (exit 8), so the entry is harmless on a node updated only by push. --jitter
# spreads a fleet's runs over 15 minutes, slept before the OTA lock is taken; a pull never
# overlaps a push or an apply (the lock: exit 6, one line). -q prints only what needs a
# person (cron mails it, or logs it when the node has no mail transport).
CRON_PATH = "etc/cron.d/spk-visor-ota"
CRON_OTA = """\
# /etc/cron.d/spk-visor-ota: pull signed updates from the repository in ota.conf's
# base_urls (/etc/spk-visor/ota.conf, on the data partition). A node without base_urls
# does not pull: the run ends at once, silently. See docs/ota.md, "Pulling from cron".
SHELL=/bin/sh
PATH=/usr/sbin:/usr/bin:/sbin:/bin
*/30 * * * *  root  spk-visor ota pull -q --jitter 900
"""

# smechvisord on root's PATH, through `current`: an OTA swap of the daemon moves the link
# `current`, so this command always runs the live release (its launcher resolves the
# release tree from its own real path).
DAEMON_COMMAND = "usr/sbin/smechvisord"
DAEMON_COMMAND_TARGET = "/opt/smechvisord/current/bin/smechvisord"

# Node-local health checks (greenboot model): required ones decide whether a trial boot of
# a new base slot is committed. They run before smechvisord starts.
HEALTH_CHECKS = {
    "required/10-root-read-only": """\
#!/bin/sh
# The slot is mounted read-only, as the image is the same signed bytes on every node.
opts=$(findmnt -n -o OPTIONS /) || { echo "cannot read the mount options of /"; exit 1; }
case ",$opts," in
*,ro,*) exit 0 ;;
*) echo "/ is mounted read-write ($opts)"; exit 1 ;;
esac
""",
    "required/20-data-partition": """\
#!/bin/sh
# The node's files and OTA state are on /data, and it is writable.
findmnt -n /data >/dev/null || { echo "/data is not mounted"; exit 1; }
probe=/data/.health-probe.$$
if ! : > "$probe"; then echo "/data is not writable"; exit 1; fi
rm -f "$probe"
""",
    "wanted/30-ssh-host-key": """\
#!/bin/sh
# Without a host key sshd does not start and the node is reachable only by its API.
[ -s /data/etc/ssh/ssh_host_ed25519_key ] || { echo "no SSH host key on /data"; exit 1; }
""",
}

# What apt, dpkg and pip are replaced with: the node is sealed.
SEALED_STUB = """\
#!/bin/sh
echo "${0##*/}: refused: SmechVisor is sealed; nothing is installed on a node." >&2
echo "The system changes only through signed updates: see spk-visor ota --help." >&2
exit 3
"""

SEALED_COMMANDS = (
    *("apt", "apt-get", "apt-cache", "apt-mark", "apt-config", "apt-key", "apt-cdrom"),
    *("dpkg", "dpkg-deb", "dpkg-query", "dpkg-divert", "dpkg-split", "dpkg-trigger"),
    *("dpkg-statoverride", "dpkg-maintscript-helper", "dpkg-realpath"),
    *("pip", "pip3", "pip3.11", "easy_install"),
)

# /usr/bin/spk-visor: the CLI from its wheels in CLI_LIB, on the image's python.
CLI_LAUNCHER = """\
#!/usr/bin/python3 -IB
# spk-visor, installed from wheels into {lib} by spk-visor image build.
import sys

sys.path.insert(0, "{lib}")
from spk_visor.cli import main

raise SystemExit(main())
"""

# bin/smechvisord of the release tree (the layout of `make dist`, docs/release-tree.md).
DAEMON_LAUNCHER = """\
#!/usr/bin/python3 -IB
# smechvisord release launcher: run the package of this release tree, whatever `current`
# points to later (realpath pins the tree at exec time).
import os
import sys

TREE = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path.insert(0, os.path.join(TREE, "lib"))
from smechvisord.main import main

raise SystemExit(main())
"""

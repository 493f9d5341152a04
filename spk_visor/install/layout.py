"""The `ab` disk layout of a node: which partitions, in which order, how big, and the
sfdisk script that writes them. Pure arithmetic and text, nothing touched.

    1 bios_grub  1 MiB, GRUB's BIOS-boot partition (core.img)
    2 esp        512 MiB, FAT32, the UEFI fallback path
    3 root-a     slot A: the signed base image, byte for byte
    4 root-b     slot B: OTA writes the next base image here
    5 data       ext4, the rest of the disk: configuration, OTA state, VM images

OTA finds the slots by these names (or, as deploy writes ota.conf, by the partition
GUIDs given here); the bootloader by these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from spk_visor.errors import RefusedError

MIB = 1 << 20
GIB = 1 << 30
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
PART_NAMES = ("bios_grub", "esp", "root-a", "root-b", "data")
BIOS_MIB = 1
ESP_MIB = 512
# 1 MiB alignment gap in front of partition 1, 1 MiB for the backup GPT at the end.
FRAME_MIB = 2
# Slots grow up to this on big disks; on small ones they shrink to what the image needs.
DEFAULT_SLOT_BYTES = 16 * GIB
# The data partition must hold the daemon pack twice (staged + unpacked), the image blob
# (kept in the node's OTA store, so the node can deploy its peers) plus this.
DATA_MIN_BYTES = 256 * MIB
ESP_LABEL = "SPK_ESP"
DATA_LABEL = "spk-data"


class TooSmall(RefusedError):
    """The disk cannot hold the layout; `need` and `have` are in bytes."""

    def __init__(self, need: int, have: int) -> None:
        super().__init__(f"the layout needs {need} bytes, the disk has {have}")
        self.need = need
        self.have = have


def _mib_up(n: int) -> int:
    return -(-n // MIB)


@dataclass(frozen=True)
class Layout:
    """Partition sizes of the `ab` profile, in MiB; data takes the rest of the disk."""

    slot_mib: int
    data_min_mib: int

    @property
    def fixed_mib(self) -> int:
        return FRAME_MIB + BIOS_MIB + ESP_MIB + 2 * self.slot_mib

    def sfdisk_script(self, partuuids: dict[str, str]) -> str:
        sizes = {"bios_grub": BIOS_MIB, "esp": ESP_MIB, "root-a": self.slot_mib}
        sizes["root-b"] = self.slot_mib
        types = {"bios_grub": BIOS_BOOT_TYPE, "esp": "U"}
        lines = ["label: gpt"]
        for name in PART_NAMES:
            size = f"size={sizes[name]}MiB, " if name in sizes else ""
            lines.append(
                f'{size}type={types.get(name, "L")}, name="{name}", uuid={partuuids[name]}'
            )
        return "\n".join(lines) + "\n"


def plan(disk_size: int, image_raw: int, pack_size: int, image_blob: int = 0) -> Layout:
    """Sizes for a disk, or TooSmall when the image (twice) and the data do not fit."""
    need_slot = max(_mib_up(image_raw), 1)
    data_min = _mib_up(DATA_MIN_BYTES + 2 * pack_size + image_blob)
    disk_mib = disk_size // MIB
    spare = disk_mib - FRAME_MIB - BIOS_MIB - ESP_MIB - data_min
    if spare < 2 * need_slot:
        raise TooSmall((FRAME_MIB + BIOS_MIB + ESP_MIB + data_min + 2 * need_slot) * MIB, disk_size)
    # A quarter of what is left for each slot (half for data), within [image, default].
    slot = max(need_slot, min(DEFAULT_SLOT_BYTES // MIB, spare // 4))
    return Layout(slot_mib=slot, data_min_mib=data_min)

"""The `ab` layout's sizing at its edges (install/layout.py): the smallest disk that fits,
one MiB less, rounding of the image and of the disk, the slot cap; and the sfdisk script."""

from __future__ import annotations

import pytest

from spk_visor.deploy.install import PlanRefused, plan_layout
from spk_visor.install import layout
from spk_visor.install.layout import MIB, Layout, TooSmall

FIXED = layout.FRAME_MIB + layout.BIOS_MIB + layout.ESP_MIB  # MiB before slots and data
DATA_MIN = layout.DATA_MIN_BYTES // MIB
CAP = layout.DEFAULT_SLOT_BYTES // MIB


def _smallest(slot_mib: int, data_mib: int = DATA_MIN) -> int:
    return (FIXED + data_mib + 2 * slot_mib) * MIB


def test_the_smallest_disk_fits_and_one_mib_less_is_refused_with_the_exact_need() -> None:
    image = 100 * MIB
    fits = layout.plan(_smallest(100), image, 0)
    assert fits == Layout(slot_mib=100, data_min_mib=DATA_MIN)
    # Every MiB of the disk is accounted for: the frame, both slots, data's minimum.
    assert fits.fixed_mib + fits.data_min_mib == _smallest(100) // MIB
    with pytest.raises(TooSmall) as caught:
        layout.plan(_smallest(100) - MIB, image, 0)
    assert (caught.value.need, caught.value.have) == (_smallest(100), _smallest(100) - MIB)
    # A disk that is not a whole number of MiB: the odd bytes are not counted.
    assert layout.plan(_smallest(100) + MIB - 1, image, 0).slot_mib == 100
    with pytest.raises(TooSmall):
        layout.plan(_smallest(100) - 1, image, 0)


def test_the_image_and_the_data_minimum_round_up_to_whole_mib() -> None:
    # One byte over 100 MiB needs a 101 MiB slot: 100 would cut the image's last byte.
    assert layout.plan(_smallest(101), 100 * MIB + 1, 0).slot_mib == 101
    with pytest.raises(TooSmall):
        layout.plan(_smallest(101) - MIB, 100 * MIB + 1, 0)
    # An empty image still gets a 1 MiB slot.
    assert layout.plan(_smallest(1), 0, 0).slot_mib == 1
    # The pack counts twice (staged and unpacked), the image blob once, each rounded up
    # together: 2 x 1 byte + 1 byte is one more MiB of data.
    assert layout.plan(_smallest(1, DATA_MIN + 1), 0, 1, 1).data_min_mib == DATA_MIN + 1
    with pytest.raises(TooSmall):
        layout.plan(_smallest(1, DATA_MIN + 1) - MIB, 0, 1, 1)


def test_slots_take_a_quarter_of_the_spare_up_to_the_cap() -> None:
    spare_at_cap = 4 * CAP  # a quarter of it is exactly the cap
    disk = (FIXED + DATA_MIN + spare_at_cap) * MIB
    assert layout.plan(disk, MIB, 0).slot_mib == CAP
    assert layout.plan(disk - 4 * MIB, MIB, 0).slot_mib == CAP - 1
    assert layout.plan(disk + 1024 * CAP * MIB, MIB, 0).slot_mib == CAP
    # An image bigger than the cap gets its own size, never less.
    assert layout.plan(_smallest(CAP + 7), (CAP + 7) * MIB, 0).slot_mib == CAP + 7


def test_deploy_refuses_a_small_disk_in_the_layouts_words() -> None:
    with pytest.raises(PlanRefused) as caught:
        plan_layout(_smallest(100) - MIB, 100 * MIB, 0)
    assert caught.value.reason == "disk_too_small"
    assert caught.value.detail == (
        f"the layout needs {_smallest(100)} bytes, the disk has {_smallest(100) - MIB}"
    )


def test_the_sfdisk_script_writes_each_partition_in_order_with_its_guid() -> None:
    uuids = {
        name: f"0000000{i}-0000-4000-8000-000000000000" for i, name in enumerate(layout.PART_NAMES)
    }
    lines = Layout(slot_mib=300, data_min_mib=DATA_MIN).sfdisk_script(uuids).splitlines()
    assert lines == [
        "label: gpt",
        f'size=1MiB, type={layout.BIOS_BOOT_TYPE}, name="bios_grub", uuid={uuids["bios_grub"]}',
        f'size=512MiB, type=U, name="esp", uuid={uuids["esp"]}',
        f'size=300MiB, type=L, name="root-a", uuid={uuids["root-a"]}',
        f'size=300MiB, type=L, name="root-b", uuid={uuids["root-b"]}',
        f'type=L, name="data", uuid={uuids["data"]}',
    ]

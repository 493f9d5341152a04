"""What OTA and deploy both do to a node, in one place.

    tree      release trees: unpack the daemon pack file by file, verify, stage read-only
              under releases/.staging-<id>, rename into place
    image     the image writer: decode into O_DIRECT windows, hash on its own thread, each
              window read back and compared while the next is written, head held back
    store_copy
              deploy's copy of the image blob into the OTA store, on its own thread,
              hashed there (the blob hash the image writer checks)
    blockdev  exclusive opens, cache drops, whole reads and writes of block devices
    runner    every external tool: argv only, bounded in time, exit status always checked
    layout    the `ab` partition layout: names, order, sizes, the sfdisk script
    disk      a whole disk made ready: size check, wipe, the layout's GPT written and
              checked against the kernel's partitions, the ESP and data filesystems

OTA feeds the image writer from a stored blob, deploy from the records of its channel;
neither carries its own copy of these steps. Only deploy prepares a whole disk (disk,
layout); OTA finds the slots the layout names.
"""

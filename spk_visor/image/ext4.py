"""A reproducible ext4 image of a staged tree: `mkfs.ext4 -d`, then times fixed with debugfs.

What would otherwise differ between two builds of the same tree, and how it is pinned:

    feature set, block and inode sizes   our own mke2fs.conf (MKE2FS_CONFIG), not the host's
    filesystem UUID, htree hash seed     -U and -E hash_seed=, derived from the inputs' hash
    superblock times (mkfs, write, check) E2FSPROGS_FAKE_TIME (mke2fs and debugfs honour it)
    inode atime/mtime/crtime             the staged tree's, clamped to SOURCE_DATE_EPOCH
                                         before mkfs (mkfs -d copies them)
    inode ctime                          the staging host's clock (mkfs -d copies st_ctime,
                                         which nobody can set): rewritten with debugfs
    inode allocation order               mkfs -d walks the tree in readdir order; the tree
                                         is staged on one filesystem, so the order repeats

No journal: the root is mounted read-only and never written on a node.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from spk_visor.image.pyenv import run

BLOCK = 4096
MIB = 1 << 20

MKE2FS_CONF = """\
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384

[fs_types]
	ext4 = {
		features = extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
"""


def ids_from(key: str) -> tuple[str, str]:
    """The filesystem UUID and the htree hash seed, from the build's input hash."""
    fs = uuid.UUID(bytes=bytes.fromhex(key[:32]), version=4)
    seed = uuid.UUID(bytes=bytes.fromhex(key[32:64]), version=4)
    return str(fs), str(seed)


def clamp_times(tree: Path, epoch: int) -> None:
    """Every atime and mtime in the tree set to `epoch` (links themselves, not targets)."""
    for dirpath, dirnames, filenames in os.walk(tree, topdown=False):
        for name in filenames + dirnames:
            os.utime(Path(dirpath, name), (epoch, epoch), follow_symlinks=False)
    os.utime(tree, (epoch, epoch))


def tree_bytes(tree: Path) -> tuple[int, int]:
    """Bytes the tree's files take in whole blocks, and its number of inodes."""
    total = 0
    inodes = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in filenames + dirnames:
            inodes += 1
            st = os.lstat(Path(dirpath, name))
            total += -(-st.st_size // BLOCK) * BLOCK
    return total, inodes


def image_size(tree: Path) -> int:
    """What the tree needs, with room for metadata, rounded up to 16 MiB."""
    used, inodes = tree_bytes(tree)
    need = used + inodes * 256 + used // 10 + 24 * MIB
    return -(-need // (16 * MIB)) * (16 * MIB)


def make(tree: Path, out: Path, *, key: str, epoch: int, work: Path, label: str) -> int:
    """Write the ext4 image of `tree` to `out`; returns its size in bytes."""
    conf = work / "mke2fs.conf"
    conf.write_text(MKE2FS_CONF)
    env = {"MKE2FS_CONFIG": str(conf), "E2FSPROGS_FAKE_TIME": str(epoch), "LC_ALL": "C"}
    fs_uuid, seed = ids_from(key)
    size = image_size(tree)
    out.unlink(missing_ok=True)
    with out.open("wb") as f:
        f.truncate(size)
    clamp_times(tree, epoch)
    extended = f"hash_seed={seed},lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0,nodiscard"
    run(
        [
            *("mkfs.ext4", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0"),
            *("-L", label, "-U", fs_uuid, "-E", extended, "-d", str(tree), str(out)),
        ],
        env=env,
    )
    _fix_inode_times(out, epoch, env, work)
    run(["e2fsck", "-f", "-n", str(out)], env=env)
    return size


def _fix_inode_times(image: Path, epoch: int, env: dict[str, str], work: Path) -> None:
    """ctime (and atime, which reading the tree touched) of every inode in use := epoch."""
    inodes = _used_inodes(image, env)
    script = work / "times.debugfs"
    with script.open("w") as f:
        for ino in inodes:
            f.write(f"sif <{ino}> ctime @{epoch}\nsif <{ino}> atime @{epoch}\n")
    run(["debugfs", "-w", "-f", str(script), str(image)], env=env)


def _used_inodes(image: Path, env: dict[str, str]) -> list[int]:
    """Inode numbers of files in use, from dumpe2fs's per-group free-inode lists."""
    text = run(["dumpe2fs", str(image)], env=env)
    per_group = 0
    count = 0
    free: set[int] = set()
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("Inodes per group:"):
            per_group = int(stripped.split(":")[1])
        elif stripped.startswith("Inode count:"):
            count = int(stripped.split(":")[1])
        elif line.startswith("  Free inodes:"):  # per group, indented; not the header's
            for raw in stripped.split(":", 1)[1].split(","):
                span = raw.strip()
                if not span:
                    continue
                lo, _, hi = span.partition("-")
                free.update(range(int(lo), int(hi or lo) + 1))
    if not per_group or not count:
        raise ValueError("dumpe2fs gave no inode counts")
    # Inode 2 is the root directory; 3..10 are reserved and their times are mkfs's own.
    return [ino for ino in range(1, count + 1) if ino not in free and (ino == 2 or ino > 10)]

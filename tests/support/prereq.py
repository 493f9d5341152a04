"""Prerequisite checks: each skips with the reason (a failure under CI=true, see conftest)."""

from __future__ import annotations

import os
import shutil

import pytest


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


def need_command(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found: install the Debian package {package} (make sysdeps)")
    return path


# What Installer.prepare runs (spk_visor.deploy.install), with their Debian packages.
DISK_TOOLS = (
    ("sfdisk", "fdisk"),
    ("wipefs", "util-linux"),
    ("partx", "util-linux"),
    ("mkfs.vfat", "dosfstools"),
    ("mkfs.ext4", "e2fsprogs"),
)


def need_commands(tools: tuple[tuple[str, str], ...]) -> None:
    for name, package in tools:
        need_command(name, package)

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

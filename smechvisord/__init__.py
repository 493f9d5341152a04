"""smechvisord: the SmechVisor node daemon. Python standard library only."""

from smechvisord.version import VERSION

__all__ = ["VERSION"]

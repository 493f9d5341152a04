"""spk-visor: the SmechVisor operator CLI and its library."""

from smechvisord.version import VERSION

__all__ = ["VERSION"]

"""The installed node's hostname: one rule for the donor (checked before it connects) and
the target (checked again in the PLAN, which it trusts no more than any other input)."""

from __future__ import annotations

import re

# RFC 1123 labels, lowercase only: the name also becomes /etc/hostname and a DNS name.
# \Z, not $: `$` also matches before a final newline, which would reach /etc/hostname.
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}\Z)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\Z"
)
RULE = (
    "use lowercase letters a-z, digits and '-' (labels of 1-63 characters separated by "
    "dots, not starting or ending with '-')"
)


def problem(name: object) -> str | None:
    """None when `name` is a valid hostname, else a sentence saying why not."""
    if isinstance(name, str) and HOSTNAME_RE.match(name):
        return None
    shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
    return f"hostname {shown} is not valid: {RULE}"

"""Which apt sources the image is built from: the build host's own, for the suite.

The host already reaches Debian's archive through its apt configuration (a mirror, a
proxy, a snapshot); the builder reuses those entries rather than naming a mirror itself.
Only active files count (apt reads *.list and *.sources), and only entries for the
image's suite and its -updates/-security companions.
"""

from __future__ import annotations

from pathlib import Path

from spk_visor.errors import ConfigError

APT_DIR = Path("/etc/apt")


def _suite_matches(suite: str, wanted: str) -> bool:
    return suite == wanted or suite.startswith(f"{wanted}-") or suite.startswith(f"{wanted}/")


def _one_line_entries(text: str, suite: str) -> list[str]:
    keep = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        # deb [options] URI SUITE COMPONENT...
        rest = words[1:]
        if rest and rest[0].startswith("["):
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) >= 2 and _suite_matches(rest[1], suite):
            keep.append(" ".join(words))
    return keep


def _deb822_entries(text: str, suite: str) -> list[str]:
    keep = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        lines = [ln for ln in stanza.splitlines() if ln.strip() and not ln.startswith("#")]
        for line in lines:
            if ":" in line and not line[0].isspace():
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if any(_suite_matches(s, suite) for s in fields.get("suites", "").split()):
            keep.append("\n".join(lines))
    return keep


def host_sources(suite: str, apt_dir: Path = APT_DIR) -> str:
    """The host's apt entries for `suite`, as one deb822-or-one-line text for mmdebstrap.

    One-line entries and deb822 stanzas cannot share a file, so one-line entries are
    returned only when the host has no deb822 ones (mmdebstrap detects the format).
    """
    files = [apt_dir / "sources.list"]
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    one_line: list[str] = []
    stanzas: list[str] = []
    for path in files:
        try:
            text = path.read_text()
        except (FileNotFoundError, UnicodeDecodeError):
            continue
        if path.suffix == ".sources":
            stanzas += _deb822_entries(text, suite)
        else:
            one_line += _one_line_entries(text, suite)
    if stanzas:
        return "\n\n".join(stanzas) + "\n"
    if one_line:
        return "\n".join(one_line) + "\n"
    raise ConfigError(
        f"this machine's apt has no sources for Debian {suite}",
        f"add a {suite} entry to /etc/apt/sources.list.d/, or pass --sources FILE",
    )

"""Which redirects `ota pull` follows (docs/ota-security.md, "Redirects")."""

from __future__ import annotations

import pytest

from spk_visor.ota import fetch


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/x",
        "http://[fe80::1]/x",
        "http://224.0.0.1/x",
        "http://0.0.0.0/x",
        "http://127.0.0.1/x",  # the mirror is not on loopback
        "https://mirror.example/x",  # another scheme
        "ftp://mirror.example/x",
        "file:///etc/passwd",
    ],
)
def test_refused(location: str) -> None:
    with pytest.raises(fetch._NextMirror, match="refusing a redirect"):
        fetch.Fetcher._redirect("http://mirror.example/v1/x", location, False)


@pytest.mark.parametrize(
    ("url", "location", "expected"),
    [
        ("http://a.example/v1/x", "/v2/x", "http://a.example/v2/x"),
        ("http://a.example/v1/x", "http://cdn.example/x", "http://cdn.example/x"),
        ("http://a.example/v1/x", "http://10.1.2.3/x", "http://10.1.2.3/x"),
        ("https://a.example/v1/x", "https://cdn.example/x", "https://cdn.example/x"),
    ],
)
def test_followed(url: str, location: str, expected: str) -> None:
    assert fetch.Fetcher._redirect(url, location, False) == expected


def test_loopback_only_from_a_loopback_mirror() -> None:
    assert fetch.Fetcher._redirect("http://127.0.0.1:1/x", "http://127.0.0.2:2/y", True)

"""Ansible inventories as a fleet source, in the formats Ansible's own documentation uses
(the "How to build your inventory" page: INI and YAML, groups of groups, ranges, host and
group variables, host:port)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spk_visor import ansible_inventory as ai
from spk_visor.errors import ConfigError

DOC_INI = """\
mail.example.com

[webservers]
foo.example.com
bar.example.com

[dbservers]
one.example.com
two.example.com
three.example.com ansible_port=5555 ansible_host=192.0.2.50

[atlanta]
host1 http_port=80 maxRequestsPerChild=808
host2 http_port=303 maxRequestsPerChild=909

[raleigh]
host2
host3

[southeast:children]
atlanta
raleigh

[southeast:vars]
some_server=foo.southeast.example.com
halon_system_timeout=30
ansible_user=sea

[atlanta:vars]
ansible_user=atl

[usa:children]
southeast
northeast

[northeast]
badwolf.example.com:5309 ansible_user=wolf
www[01:03].example.com
db-[a:c]-node.example.com
web[1:9:4].example.com

[all:vars]
ansible_user=admin
"""

DOC_YAML = """\
all:
  hosts:
    mail.example.com:
  vars:
    ansible_user: admin
  children:
    webservers:
      hosts:
        foo.example.com:
        bar.example.com:
    dbservers:
      hosts:
        one.example.com:
        two.example.com:
        three.example.com:
          ansible_port: 5555
          ansible_host: 192.0.2.50
    east:
      hosts:
        foo.example.com:
        one.example.com:
        two.example.com:
    west:
      hosts:
        bar.example.com:
        three.example.com:
    prod:
      children:
        east:
        west:
      vars:
        ansible_user: produser
    test:
      hosts:
        www[01:02].example.com:
        badwolf.example.com:5309:
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _names(hosts: list[ai.InventoryHost]) -> list[str]:
    return [h.name for h in hosts]


def test_ini_groups_children_and_ranges(tmp_path: Path) -> None:
    inv = ai.load(_write(tmp_path, "hosts", DOC_INI))
    assert _names(inv.hosts("webservers")) == ["foo.example.com", "bar.example.com"]
    # Children of children, once each, in file order.
    assert _names(inv.hosts("southeast")) == ["host1", "host2", "host3"]
    usa = _names(inv.hosts("usa"))
    assert usa[:3] == ["host1", "host2", "host3"]
    assert usa[3:] == [
        "badwolf.example.com",
        "www01.example.com",
        "www02.example.com",
        "www03.example.com",
        "db-a-node.example.com",
        "db-b-node.example.com",
        "db-c-node.example.com",
        "web1.example.com",
        "web5.example.com",
        "web9.example.com",
    ]
    assert _names(inv.hosts("ungrouped")) == ["mail.example.com"]
    assert len(inv.hosts("all")) == 19


def test_ini_host_variables_and_precedence(tmp_path: Path) -> None:
    inv = ai.load(_write(tmp_path, "hosts", DOC_INI))
    three = inv.host("three.example.com")
    assert (three.address, three.port, three.user) == ("192.0.2.50", 5555, "admin")
    # host:port in the pattern is the SSH port; a host variable beats every group.
    wolf = inv.host("badwolf.example.com")
    assert (wolf.address, wolf.port, wolf.user) == ("badwolf.example.com", 5309, "wolf")
    # atlanta is deeper than southeast, which is deeper than all: the deepest group wins.
    assert inv.host("host1").user == "atl"
    assert inv.host("host3").user == "sea"
    assert inv.host("mail.example.com").user == "admin"
    # Host-line values are Python literals; [group:vars] values stay strings.
    assert inv.host("host1").vars["http_port"] == 80
    assert inv.host("host1").vars["halon_system_timeout"] == "30"


def test_yaml_same_shapes(tmp_path: Path) -> None:
    inv = ai.load(_write(tmp_path, "hosts.yml", DOC_YAML))
    assert _names(inv.hosts("prod")) == [
        "foo.example.com",
        "bar.example.com",
        "one.example.com",
        "two.example.com",
        "three.example.com",
    ]
    assert inv.host("three.example.com").address == "192.0.2.50"
    assert inv.host("three.example.com").port == 5555
    assert inv.host("foo.example.com").user == "produser"
    assert inv.host("mail.example.com").user == "admin"
    assert _names(inv.hosts("test")) == [
        "www01.example.com",
        "www02.example.com",
        "badwolf.example.com",
    ]
    assert inv.host("badwolf.example.com").port == 5309


def test_yaml_detected_without_suffix(tmp_path: Path) -> None:
    inv = ai.load(_write(tmp_path, "inventory", DOC_YAML))
    assert len(inv.hosts("all")) == 9


def test_our_own_variables(tmp_path: Path) -> None:
    inv = ai.load(
        _write(
            tmp_path,
            "h",
            "[rack1]\nn1 spk_visor_daemon_port=9000"
            " spk_visor_remote_command=/opt/sv/bin/spk-visor\nn2\n",
        )
    )
    assert [h.daemon_port for h in inv.hosts("rack1")] == [9000, None]
    assert [h.remote_command for h in inv.hosts("rack1")] == ["/opt/sv/bin/spk-visor", None]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[a:children]\nb\n[b:children]\na\n", "cycle: a -> b -> a"),
        ("[a]\nhost1 novalue\n", "expected key=value"),
        ("[a:weird]\nx\n", r"expected \[a\], \[a:vars\]"),
        ("[a]\nwww[1:999999999].x\n", "more than"),
        ("[a]\nwww[z:1].x\n", "bad range"),
        ("[a]\nhost1:99999\n", "not a port number"),
        ("[a:vars]\njunk\n", "expected key=value"),
        ("[bad group]\nx\n", "not a valid group name"),
        ("[a]\nh ansible_port=http\n", None),
    ],
)
def test_ini_mistakes_name_the_line(tmp_path: Path, text: str, message: str | None) -> None:
    path = _write(tmp_path, "hosts", text)
    if message is None:  # loads; the bad port shows when the host is used
        with pytest.raises(ConfigError, match="not a port number"):
            _ = ai.load(path).hosts("a")[0].port
        return
    with pytest.raises(ConfigError, match=message) as info:
        ai.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("all:\n  hostz: {}\n", "unknown key 'hostz'"),
        ("- a\n- b\n", "top level must map"),
        ("all:\n  hosts: [a, b]\n", "hosts must be a mapping"),
        ("all: &x\n  children:\n    b: *x\n", "aliases"),
        ("all:\n  hosts:\n    a: [1\n", "invalid YAML"),
    ],
)
def test_yaml_mistakes(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ai.load(_write(tmp_path, "h.yaml", text))


def test_unknown_group_lists_the_known_ones(tmp_path: Path) -> None:
    inv = ai.load(_write(tmp_path, "hosts", DOC_INI))
    with pytest.raises(ConfigError, match=r"no group 'rack9'.*atlanta.*webservers"):
        inv.hosts("rack9")


def test_missing_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        ai.load(tmp_path / "nope")
    with pytest.raises(ConfigError, match="is a folder"):
        ai.load(tmp_path)

"""Ansible inventories (INI and YAML) as a fleet source.

Admins who run a rack already keep its hosts in an Ansible inventory; `spk-visor
--inventory hosts.ini --fleet rack1` reads that file instead of restating the fleet in
config.toml. What is honoured, as Ansible's own documentation describes it:

- groups, `[group:children]` / `children:` (nested to any depth, cycles refused), the
  implicit `all` and `ungrouped`;
- host ranges `www[01:50].example.com`, `db-[a:f]`, with an optional stride `[1:9:2]`;
- `host:port` in a host pattern;
- variables on host lines, in `[group:vars]` / `vars:`, with Ansible's precedence: `all`,
  then groups from the shallowest to the deepest (siblings by name), then the host;
- of those variables: `ansible_host`, `ansible_port`, `ansible_user` (and the older
  `ansible_ssh_*` names), and our own `spk_visor_daemon_port`, `spk_visor_token_file`
  (where the daemon's token is on the node, when not in the default place) and
  `spk_visor_remote_command` (spk-visor on the node, for `ota push`).

Everything else (plugins, `host_vars/` folders, vault, patterns such as `a:&b`) is not
read; a group name is all `--fleet` takes.
"""

from __future__ import annotations

import ast
import re
import shlex
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spk_visor.capped_read import read_at_most
from spk_visor.errors import ConfigError

MAX_INVENTORY_BYTES = 4 << 20
# A range expands to at most this many hosts: a typo such as [1:999999] must not eat memory.
MAX_RANGE = 100_000
_RANGE_RE = re.compile(r"\[([^\]:]*):([^\]:]*)(?::([^\]:]*))?\]")
_GROUP_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class InventoryError(ConfigError):
    """The inventory file cannot be used; the message names file and line."""


@dataclass
class Group:
    name: str
    hosts: list[str] = field(default_factory=list)  # in order of appearance
    children: list[str] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InventoryHost:
    """One host with its variables resolved, and how to reach it over SSH."""

    name: str
    vars: dict[str, Any]

    @property
    def address(self) -> str:
        return str(self.vars.get("ansible_host") or self.vars.get("ansible_ssh_host") or self.name)

    @property
    def user(self) -> str | None:
        user = self.vars.get("ansible_user") or self.vars.get("ansible_ssh_user")
        return str(user) if user else None

    @property
    def port(self) -> int | None:
        return _int_var(self, "ansible_port", "ansible_ssh_port")

    @property
    def daemon_port(self) -> int | None:
        return _int_var(self, "spk_visor_daemon_port")

    @property
    def token_file(self) -> str | None:
        value = self.vars.get("spk_visor_token_file")
        return str(value) if value else None

    @property
    def remote_command(self) -> str | None:
        value = self.vars.get("spk_visor_remote_command")
        return str(value) if value else None


def _int_var(host: InventoryHost, *names: str) -> int | None:
    for name in names:
        value = host.vars.get(name)
        if value is None or value == "":
            continue
        try:
            number = int(str(value))
        except ValueError:
            raise InventoryError(
                f"host {host.name}: {name}={value!r} is not a port number"
            ) from None
        if not 0 < number < 65536:
            raise InventoryError(f"host {host.name}: {name}={number} is out of range")
        return number
    return None


class Inventory:
    """Groups and hosts as read from one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.groups: dict[str, Group] = {"all": Group("all"), "ungrouped": Group("ungrouped")}
        self.host_vars: dict[str, dict[str, Any]] = {}
        self._order: list[str] = []  # every host, in order of first appearance

    # -- building -----------------------------------------------------------------

    def group(self, name: str, where: str) -> Group:
        if not _GROUP_RE.match(name):
            raise InventoryError(f"{where}: {name!r} is not a valid group name")
        return self.groups.setdefault(name, Group(name))

    def add_host(self, group: Group, name: str, variables: dict[str, Any]) -> None:
        if name not in self.host_vars:
            self.host_vars[name] = {}
            self._order.append(name)
        self.host_vars[name].update(variables)
        if name not in group.hosts:
            group.hosts.append(name)

    def add_child(self, parent: Group, child: Group) -> None:
        if child.name not in parent.children:
            parent.children.append(child.name)

    def finish(self) -> None:
        """Close the implicit groups and refuse cycles (Ansible does too)."""
        for name in self.groups:
            self._depths(name, ())
        grouped = {
            h for g in self.groups.values() if g.name not in ("all", "ungrouped") for h in g.hosts
        }
        for host in self._order:
            if host not in grouped and host not in self.groups["ungrouped"].hosts:
                self.groups["ungrouped"].hosts.append(host)
        self.groups["ungrouped"].hosts = [
            h for h in self.groups["ungrouped"].hosts if h not in grouped
        ]

    def _depths(self, name: str, path: tuple[str, ...]) -> None:
        if name in path:
            cycle = " -> ".join((*path[path.index(name) :], name))
            raise InventoryError(f"{self.path}: groups form a cycle: {cycle}")
        for child in self.groups[name].children:
            self._depths(child, (*path, name))

    # -- reading ------------------------------------------------------------------

    def hosts(self, group: str) -> list[InventoryHost]:
        """Every host of `group` and of its children, once each, in file order."""
        if group == "all":
            members = set(self._order)
        elif group in self.groups:
            members = set()
            self._collect(group, members)
        else:
            known = ", ".join(sorted(g for g in self.groups if self._has_hosts(g))) or "none"
            raise InventoryError(f"no group {group!r} in {self.path} (groups: {known})")
        return [self.host(h) for h in self._order if h in members]

    def _has_hosts(self, group: str) -> bool:
        members: set[str] = set()
        self._collect(group, members)
        return bool(members) or group == "all"

    def _collect(self, group: str, out: set[str]) -> None:
        g = self.groups[group]
        out.update(g.hosts)
        for child in g.children:
            self._collect(child, out)

    def host(self, name: str) -> InventoryHost:
        if name not in self.host_vars:
            raise InventoryError(f"no host {name!r} in {self.path}")
        merged: dict[str, Any] = {}
        for group in self._groups_by_precedence(name):
            merged.update(group.vars)
        merged.update(self.host_vars[name])
        return InventoryHost(name, merged)

    def _groups_by_precedence(self, host: str) -> list[Group]:
        """The host's groups, lowest precedence first: by depth below `all`, then by name."""
        depth: dict[str, int] = {}

        def walk(name: str, level: int) -> None:
            if depth.get(name, -1) >= level:
                return
            depth[name] = level
            for child in self.groups[name].children:
                walk(child, level + 1)

        walk("all", 0)
        for name in self.groups:  # groups nobody names as a child hang below `all`
            if name not in depth:
                walk(name, 1)
        mine = {name for name in self.groups if self._contains(name, host)}
        mine.add("all")
        return [self.groups[n] for n in sorted(mine, key=lambda n: (depth.get(n, 1), n))]

    def _contains(self, group: str, host: str) -> bool:
        members: set[str] = set()
        self._collect(group, members)
        return host in members


def load(path: Path) -> Inventory:
    """Read an INI or YAML inventory; YAML when the suffix says so or the text is a
    mapping, INI otherwise (as Ansible tries its plugins)."""
    try:
        raw = read_at_most(path, MAX_INVENTORY_BYTES)
    except FileNotFoundError:
        raise InventoryError(
            f"inventory file {path} does not exist", "give the path of an Ansible inventory"
        ) from None
    except IsADirectoryError:
        raise InventoryError(
            f"inventory {path} is a folder", "give one inventory file (INI or YAML)"
        ) from None
    except OSError as e:
        raise InventoryError(f"cannot read inventory {path}: {e.strerror or e}") from e
    if len(raw) > MAX_INVENTORY_BYTES:
        raise InventoryError(f"inventory {path} is larger than {MAX_INVENTORY_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InventoryError(f"{path}: not UTF-8 text ({e})") from e
    inventory = Inventory(path)
    if path.suffix in (".yml", ".yaml") or _looks_like_yaml(text):
        _read_yaml(inventory, text)
    else:
        _read_ini(inventory, text)
    inventory.finish()
    return inventory


def _looks_like_yaml(text: str) -> bool:
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";", "---")):
            continue
        # An INI inventory starts with a [section] or a host; YAML with `name:`.
        return bool(re.match(r"^[A-Za-z0-9_.-]+:\s*(#.*)?$", stripped))
    return False


# -- host patterns ---------------------------------------------------------------------


def expand_pattern(pattern: str, where: str) -> tuple[list[str], int | None]:
    """`www[01:03].example.com:2222` -> the three names and the port."""
    port: int | None = None
    head = pattern
    # host:port, but not an IPv6 address (several colons) or a range ([1:3]).
    if head.count(":") == 1 and not _RANGE_RE.search(head):
        head, _, port_text = head.partition(":")
        port = _port(port_text, where)
    elif (
        head.startswith("[") and "]:" in head and not _RANGE_RE.fullmatch(head.split("]:")[0] + "]")
    ):
        address, _, port_text = head[1:].partition("]:")
        head, port = address, _port(port_text, where)
    elif _RANGE_RE.search(head):
        # A port after a range: www[1:3]:2222.
        m = re.match(r"^(.*\])\:(\d+)$", head)
        if m:
            head, port = m.group(1), _port(m.group(2), where)
    names = _expand(head, where)
    return names, port


def _port(text: str, where: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise InventoryError(f"{where}: {text!r} is not a port number")
    return int(text)


def _expand(pattern: str, where: str) -> list[str]:
    m = _RANGE_RE.search(pattern)
    if not m:
        if not pattern or any(c.isspace() for c in pattern):
            raise InventoryError(f"{where}: {pattern!r} is not a host name")
        return [pattern]
    start, end, stride_text = m.group(1), m.group(2), m.group(3)
    stride = 1
    if stride_text:
        if not stride_text.isdigit() or int(stride_text) == 0:
            raise InventoryError(f"{where}: bad stride {stride_text!r} in {pattern!r}")
        stride = int(stride_text)
    prefix, suffix = pattern[: m.start()], pattern[m.end() :]
    if start.isdigit() and end.isdigit():
        width = len(start) if start.startswith("0") else 0
        numbers = range(int(start), int(end) + 1, stride)
        if len(numbers) > MAX_RANGE:
            raise InventoryError(f"{where}: {pattern!r} expands to more than {MAX_RANGE} hosts")
        parts = [str(n).zfill(width) for n in numbers]
    elif (
        len(start) == 1
        and len(end) == 1
        and start in string.ascii_letters
        and end in string.ascii_letters
    ):
        parts = [chr(c) for c in range(ord(start), ord(end) + 1, stride)]
    else:
        raise InventoryError(
            f"{where}: bad range [{start}:{end}] in {pattern!r}",
            "use [01:50] (numbers) or [a:f] (single letters)",
        )
    if not parts:
        raise InventoryError(f"{where}: range [{start}:{end}] in {pattern!r} is empty")
    out: list[str] = []
    for part in parts:
        # Further ranges in the suffix multiply.
        out.extend(_expand(prefix + part + suffix, where))
        if len(out) > MAX_RANGE:
            raise InventoryError(f"{where}: {pattern!r} expands to more than {MAX_RANGE} hosts")
    return out


# -- INI ---------------------------------------------------------------------------------


def _ini_value(text: str) -> Any:
    """A host line's value is a Python literal when it parses as one, else a string
    (Ansible's rule); `[group:vars]` values stay strings."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _read_ini(inventory: Inventory, text: str) -> None:
    section, kind = "ungrouped", "hosts"
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{inventory.path}:{number}"
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("["):
            m = re.match(r"^\[([^\]:]+)(?::(\w+))?\]\s*(?:[#;].*)?$", stripped)
            if not m:
                raise InventoryError(f"{where}: cannot read section header {stripped!r}")
            section, kind = m.group(1), m.group(2) or "hosts"
            if kind not in ("hosts", "vars", "children"):
                raise InventoryError(
                    f"{where}: [{section}:{kind}]: expected [{section}], [{section}:vars] or "
                    f"[{section}:children]"
                )
            inventory.group(section, where)
            continue
        try:
            words = shlex.split(stripped, comments=True)
        except ValueError as e:
            raise InventoryError(f"{where}: {e}") from None
        if not words:
            continue
        group = inventory.group(section, where)
        if kind == "children":
            if len(words) != 1:
                raise InventoryError(f"{where}: one group name per line under [{section}:children]")
            inventory.add_child(group, inventory.group(words[0], where))
        elif kind == "vars":
            key, eq, value = stripped.partition("=")
            if not eq or not key.strip():
                raise InventoryError(f"{where}: expected key=value under [{section}:vars]")
            group.vars[key.strip()] = value.strip()
        else:
            names, port = expand_pattern(words[0], where)
            variables: dict[str, Any] = {}
            for word in words[1:]:
                key, eq, value = word.partition("=")
                if not eq or not key:
                    raise InventoryError(
                        f"{where}: expected key=value after the host name, got {word!r}"
                    )
                variables[key] = _ini_value(value)
            if port is not None:
                variables.setdefault("ansible_port", port)
            for name in names:
                inventory.add_host(group, name, variables)


# -- YAML --------------------------------------------------------------------------------


def _read_yaml(inventory: Inventory, text: str) -> None:
    import yaml  # noqa: PLC0415 (only an inventory in YAML pays for the import)

    try:
        # Anchors and aliases let a small file expand without bound (a "billion laughs");
        # no inventory needs them.
        if any(isinstance(ev, yaml.AliasEvent) for ev in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise InventoryError(f"{inventory.path}: YAML aliases (*name) are not accepted")
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise InventoryError(f"{inventory.path}{line}: invalid YAML: {e}") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise InventoryError(f"{inventory.path}: the top level must map group names")
    for name, body in data.items():
        _yaml_group(inventory, str(name), body, depth=0)


def _yaml_group(inventory: Inventory, name: str, body: Any, depth: int) -> Group:
    where = f"{inventory.path}: group {name}"
    if depth > 64:
        raise InventoryError(f"{where}: groups nest deeper than 64")
    group = inventory.group(name, where)
    if body is None:
        return group
    if not isinstance(body, dict):
        raise InventoryError(f"{where}: expected a mapping with hosts, vars or children")
    unknown = set(body) - {"hosts", "vars", "children"}
    if unknown:
        raise InventoryError(
            f"{where}: unknown key {sorted(map(str, unknown))[0]!r}; expected hosts, vars, children"
        )
    variables = body.get("vars") or {}
    if not isinstance(variables, dict):
        raise InventoryError(f"{where}: vars must be a mapping")
    group.vars.update({str(k): v for k, v in variables.items()})
    hosts = body.get("hosts") or {}
    if not isinstance(hosts, dict):
        raise InventoryError(f"{where}: hosts must be a mapping of host names")
    for pattern, host_vars in hosts.items():
        if host_vars is not None and not isinstance(host_vars, dict):
            raise InventoryError(f"{where}: host {pattern}: variables must be a mapping")
        names, port = expand_pattern(str(pattern), where)
        hv = {str(k): v for k, v in (host_vars or {}).items()}
        if port is not None:
            hv.setdefault("ansible_port", port)
        for host in names:
            inventory.add_host(group, host, hv)
    children = body.get("children") or {}
    if not isinstance(children, dict):
        raise InventoryError(f"{where}: children must be a mapping of group names")
    for child_name, child_body in children.items():
        child = _yaml_group(inventory, str(child_name), child_body, depth + 1)
        inventory.add_child(group, child)
    return group

"""`spk-visor ota ...`: signed updates (design/ota.md).

Build side (workstation): keygen, root, build, inspect, verify, publish, bundle, push.
Node side (on the node, as root): check, apply, pull, status, commit, rollback, discard,
history, verify-installed, recover, boot-check. The work is in spk_visor.ota.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer

from spk_visor.commands.common import AppState, JsonOpt, state
from spk_visor.errors import ExitCode, SpkVisorError, UsageError, redact
from spk_visor.output import table

app = typer.Typer(
    help="Signed updates: build and publish releases; check, apply, pull and roll back on a node.",
    no_args_is_help=True,
)
root_app = typer.Typer(help="The root document: which keys sign what, with thresholds.")
bundle_app = typer.Typer(help="Convert between a .spkb bundle and a pull repository.")
app.add_typer(root_app, name="root")
app.add_typer(bundle_app, name="bundle")


def _record_quiet(ctx: typer.Context, value: bool) -> bool:
    # main() reports failures after the command is gone: it reads -q from here, the
    # parsed value, not from argv (where "-q" may be another option's value).
    st = ctx.find_object(AppState)
    if st is not None:
        st.quiet = value
    return value


QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        callback=_record_quiet,
        help="For cron: print nothing on success, when there is nothing to do, or when "
        "nothing may be done now (exit 0, 77, 8); otherwise one line on stderr naming the cause.",
    ),
]
Unchanged77 = Annotated[
    bool,
    typer.Option("--unchanged-exit-77", help="Exit 77 instead of 0 when there was nothing to do."),
]
KeyOpt = Annotated[
    list[Path],
    typer.Option(
        "--key", "-k", metavar="PRIVATE_KEY", help="Signing key (repeat for a threshold)."
    ),
]
PassFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--passphrase-file",
        metavar="FILE",
        help="Read the key passphrase from FILE (or set SPK_VISOR_OTA_PASSPHRASE).",
    ),
]

_DURATION = re.compile(r"^(\d+)([hdwy])$")
_UNITS = {"h": 1 / 24, "d": 1, "w": 7, "y": 365}


def duration(text: str) -> dt.timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise UsageError(f"bad duration {text!r}", "use a number and h, d, w or y: 12h, 7d, 3y")
    return dt.timedelta(days=int(match.group(1)) * _UNITS[match.group(2)])


# A passphrase is one line; a file past this is the wrong file (or a device).
MAX_PASSPHRASE_BYTES = 4096


def _passphrase(path: Path | None) -> bytes | None:
    if path is None:
        return None
    from spk_visor.capped_read import read_at_most  # noqa: PLC0415

    try:
        secret = read_at_most(path, MAX_PASSPHRASE_BYTES)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from e
    if len(secret) > MAX_PASSPHRASE_BYTES:
        raise UsageError(
            f"--passphrase-file {path} is larger than {MAX_PASSPHRASE_BYTES} bytes",
            "give a file that holds the passphrase alone, on one line",
        )
    return secret.rstrip(b"\r\n")


def _signing_keys(paths: list[Path], passphrase_file: Path | None) -> list[Any]:
    from spk_visor.ota.keys import load_signing_key  # noqa: PLC0415 (cryptography only when signing)

    secret = _passphrase(passphrase_file)
    return [load_signing_key(p, secret) for p in paths]


def _root_file(path: Path) -> Any:
    """The root document (a DSSE envelope) in a file the user named; anything else is
    their mistake (exit 2), said with the file's name (ota/roots.py)."""
    from spk_visor.ota import roots  # noqa: PLC0415

    return roots.document(path)


def _check_role_keys(
    signing: list[Any],
    paths: list[Path],
    what: str,
    acceptable: dict[str, set[str]],
    extra: str | None = None,
) -> None:
    """Refuse (exit 2) a signing key that is not among `acceptable` ({where: key ids}):
    its signature would count for nothing, and the mistake would show only on the nodes."""
    allowed = set().union(*acceptable.values())
    for k, path in zip(signing, paths, strict=True):
        if k.keyid not in allowed:
            listed = "; ".join(
                f"{name}: {', '.join(sorted(ids))}" for name, ids in acceptable.items()
            )
            hint = f"acceptable key ids ({listed})" + (f"; {extra}" if extra else "")
            raise UsageError(f"{path} (key id {k.keyid}) is not {what}", hint)


def _print(ctx: typer.Context, as_json: bool, doc: Any, text: str) -> None:
    st = state(ctx, as_json)
    if st.json:
        st.console.json(doc)
    else:
        st.console.print(text)


# ---- build side --------------------------------------------------------------------


@app.command()
def keygen(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(metavar="PRIVATE_KEY", help="Where to write the key.")],
    ask_passphrase: Annotated[
        bool, typer.Option("--ask-passphrase", help="Encrypt the key; ask for a passphrase.")
    ] = False,
    passphrase_file: PassFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make an ed25519 signing key: PRIVATE_KEY (mode 0600) and PRIVATE_KEY.pub."""
    from spk_visor.ota.keys import write_keypair  # noqa: PLC0415
    from spk_visor.trust import keys  # noqa: PLC0415

    if not out.name or out.is_dir():
        # "" (an unset shell variable) is Path("."): a folder, with no name to add .pub to.
        raise UsageError(
            f"PRIVATE_KEY {str(out)!r} is a folder, not a key file name",
            "name the new key's file, e.g. spk-visor ota keygen keys/rel",
        )
    from spk_visor.ota.keys import check_new_key  # noqa: PLC0415

    check_new_key(out)  # before a passphrase is asked for
    secret = _passphrase(passphrase_file)
    if ask_passphrase:
        first = getpass.getpass("passphrase: ")
        if first != getpass.getpass("again: "):
            raise UsageError("the passphrases differ")
        secret = first.encode() or None
    key = keys.generate()
    pub = write_keypair(key, out, secret)
    doc = {"private": str(out), "public": str(pub), "keyid": key.keyid}
    _print(ctx, as_json, doc, f"wrote {out} and {pub}\nkeyid {key.keyid}")


def _role_args(**keys_by_role: tuple[int, list[Path]]) -> dict[str, Any]:
    """{role: (threshold, [public keys])} from the --ROLE-key/--ROLE-threshold options."""
    from spk_visor.ota.keys import load_public_key  # noqa: PLC0415

    out: dict[str, Any] = {}
    for role, (threshold, paths) in keys_by_role.items():
        if not paths:
            raise UsageError(f"no {role} key given", f"give --{role}-key PUBLIC_KEY")
        if not 1 <= threshold <= len(paths):
            raise UsageError(f"--{role}-threshold {threshold} is not within 1..{len(paths)}")
        out[role] = (threshold, [load_public_key(p) for p in paths])
    return out


RootKeys = Annotated[list[Path], typer.Option("--root-key", help="Root role public key (repeat).")]
ReleaseKeys = Annotated[
    list[Path], typer.Option("--release-key", help="Release role public key (repeat).")
]
ChannelKeys = Annotated[
    list[Path], typer.Option("--channel-key", help="Channel role public key (repeat).")
]
RootT = Annotated[int, typer.Option("--root-threshold", help="Root signatures required.")]
ReleaseT = Annotated[int, typer.Option("--release-threshold", help="Release signatures required.")]
ChannelT = Annotated[int, typer.Option("--channel-threshold", help="Channel signatures required.")]
ExpiresOpt = Annotated[str, typer.Option("--expires", help="Validity: 3y, 52w, 90d, 12h.")]


def _write_root(out: Path, version: int, expires: str, dev: bool, roles: dict[str, Any]) -> Any:
    from spk_visor.trust import dsse, roots  # noqa: PLC0415

    payload = roots.payload(
        version,
        dt.datetime.now(dt.UTC).replace(microsecond=0) + duration(expires),
        roles,
        dev=dev,
    )
    env = dsse.new(dsse.ROOT_TYPE, payload)
    out.write_bytes(env.to_bytes())
    return payload


@root_app.command("init")
def root_init(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="Root document to write.")],
    root_key: RootKeys,
    release_key: ReleaseKeys,
    channel_key: ChannelKeys,
    root_threshold: RootT = 1,
    release_threshold: ReleaseT = 1,
    channel_threshold: ChannelT = 1,
    expires: ExpiresOpt = "3y",
    dev: Annotated[
        bool, typer.Option("--dev", help="A development root (dev releases only).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write root version 1 (unsigned): then `ota root sign` it with the root keys."""
    if out.exists():
        raise UsageError(f"{out} exists", "a root document is never overwritten; use rotate")
    roles = _role_args(
        root=(root_threshold, root_key),
        release=(release_threshold, release_key),
        channel=(channel_threshold, channel_key),
    )
    payload = _write_root(out, 1, expires, dev, roles)
    _print(
        ctx,
        as_json,
        payload,
        f"wrote {out}: root v1, expires {payload['expires']}\n"
        f"next: spk-visor ota root sign {out} --key ROOT_KEY (x{root_threshold})",
    )


@root_app.command("rotate")
def root_rotate(
    ctx: typer.Context,
    old: Annotated[Path, typer.Argument(help="The current root document.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The new root document.")],
    root_key: RootKeys,
    release_key: ReleaseKeys,
    channel_key: ChannelKeys,
    root_threshold: RootT = 1,
    release_threshold: ReleaseT = 1,
    channel_threshold: ChannelT = 1,
    expires: ExpiresOpt = "3y",
    as_json: JsonOpt = False,
) -> None:
    """Write root version N+1 with the given keys; it needs signatures from the threshold
    of the old root AND of the new one (sign it with both sets)."""
    from spk_visor.trust import roots  # noqa: PLC0415

    if out.exists():
        raise UsageError(f"{out} exists", "a root document is never overwritten")
    current = roots.parse_unverified(_root_file(old))
    roles = _role_args(
        root=(root_threshold, root_key),
        release=(release_threshold, release_key),
        channel=(channel_threshold, channel_key),
    )
    payload = _write_root(out, current.version + 1, expires, current.dev, roles)
    _print(
        ctx,
        as_json,
        payload,
        f"wrote {out}: root v{payload['version']}\n"
        f"sign it with the new root keys and the old ones: spk-visor ota root sign {out} "
        f"--previous {old} --key ROOT_KEY ...",
    )


@root_app.command("sign")
def root_sign(
    ctx: typer.Context,
    document: Annotated[Path, typer.Argument(help="Root document to add signatures to.")],
    key: KeyOpt,
    previous: Annotated[
        Path | None,
        typer.Option(
            "--previous",
            metavar="ROOT",
            help="The root this one replaces (version N-1): its root keys may sign too.",
        ),
    ] = None,
    passphrase_file: PassFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add signatures to a root document, in place (offline, one key holder at a time).

    Only its own root keys count, and for a rotated root (version N+1) the root keys of
    version N, given with --previous: any other key is refused, nothing is written."""
    from spk_visor.ota import durable  # noqa: PLC0415
    from spk_visor.trust import roots  # noqa: PLC0415

    env = _root_file(document)
    this = roots.parse_unverified(env)
    acceptable = {f"root v{this.version}": this.keyids("root")}
    if previous is not None:
        before = roots.parse_unverified(_root_file(previous))
        if before.version != this.version - 1:
            raise UsageError(
                f"{previous} is root version {before.version}, not {this.version - 1}",
                f"give the root that {document} (version {this.version}) replaces",
            )
        acceptable[f"root v{before.version}"] = before.keyids("root")
    signing = _signing_keys(key, passphrase_file)
    extra = None
    if previous is None and this.version > 1:
        extra = (
            f"a key of root v{this.version - 1} signs too when that root is given with --previous"
        )
    _check_role_keys(signing, key, f"a root key of {document}", acceptable, extra)
    for k in signing:
        env.sign(k)
    durable.write_bytes(document, env.to_bytes(), 0o644)
    ids = [k for k, _ in env.signatures]
    _print(ctx, as_json, {"signatures": ids}, f"{document}: {len(ids)} signature(s)")


@app.command()
def build(
    ctx: typer.Context,
    version: Annotated[
        str, typer.Option("--version", metavar="VERSION", help="Release version, e.g. 2.5.0.")
    ],
    counter: Annotated[int, typer.Option("--counter", min=1, help="Anti-rollback counter.")],
    key: KeyOpt,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Bundle to write (X.spkb); its signed manifest is written beside it as "
            "X.manifest.json.",
        ),
    ],
    daemon_tree: Annotated[
        Path | None,
        typer.Option(
            "--daemon-tree",
            help="smechvisord release tree (a folder with an executable bin/smechvisord and "
            "lib/smechvisord/version.py saying --version).",
        ),
    ] = None,
    base_image: Annotated[
        Path | None, typer.Option("--base-image", help="Base system: a raw ext4 image.")
    ] = None,
    set_floor: Annotated[
        int, typer.Option("--set-floor", min=0, help="Raise nodes' floor to this at commit.")
    ] = 0,
    requires_base_counter: Annotated[
        int, typer.Option("--requires-base-counter", min=0, help="Daemon needs this base.")
    ] = 0,
    root_doc: Annotated[
        list[Path], typer.Option("--root", help="Root documents to carry (offline rotation).")
    ] = [],  # noqa: B006 (typer reads the default; it is never mutated)
    probation: Annotated[
        float,
        typer.Option(
            "--probation",
            metavar="SECONDS",
            help="How long a new daemon must stay healthy before it is kept (0 to 3600, "
            "0 excluded).",
        ),
    ] = 30,
    dev: Annotated[bool, typer.Option("--dev", help="A development release.")] = False,
    passphrase_file: PassFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Build a signed .spkb bundle from a daemon tree and/or a base image; also write
    its manifest as X.manifest.json beside X.spkb (for review and archives)."""
    from spk_visor.ota import build as build_mod  # noqa: PLC0415
    from spk_visor.trust import roots  # noqa: PLC0415

    root_envs = [_root_file(p) for p in root_doc]
    signing = _signing_keys(key, passphrase_file)
    if root_envs:  # the newest carried root names the release keys; else only nodes can tell
        newest = max((roots.parse_unverified(e) for e in root_envs), key=lambda r: r.version)
        where = {f"release role of root v{newest.version}": newest.keyids("release")}
        _check_role_keys(signing, key, "a release key", where)
    result = build_mod.build(
        out=out,
        version=version,
        counter=counter,
        keys=signing,
        daemon_tree=daemon_tree,
        base_image=base_image,
        set_floor=set_floor,
        roots=root_envs,
        dev=dev,
        base_counter_min=requires_base_counter,
        probation_s=probation,
    )
    doc = {
        "bundle": str(result.bundle),
        "manifest": str(result.manifest_path),
        "manifest_sha256": result.manifest_sha256,
        "size": result.bundle.stat().st_size,
        "blobs": [{"id": b.id, "size": b.size} for b in result.blobs],
    }
    _print(
        ctx,
        as_json,
        doc,
        f"wrote {result.bundle} ({doc['size']} bytes)\nmanifest {result.manifest_sha256}",
    )


def _open_bundle(path: str) -> BinaryIO:
    if path == "-":
        from spk_visor.ota.bundle import widen_pipe  # noqa: PLC0415

        widen_pipe(sys.stdin)
        return sys.stdin.buffer
    from spk_visor.ota.bundle import check_is_bundle, check_pipe_start, missing_hint  # noqa: PLC0415

    # A file the user named that is not a bundle at all is their mistake (exit 2), not a
    # refused update (3): a regular file is looked at before it is opened, a pipe
    # (-b <(...)) by its first bytes, left in the buffer for the reader.
    check_is_bundle(path)
    try:
        f = Path(path).open("rb")  # noqa: SIM115 (the caller closes it)
    except OSError as e:
        raise UsageError(f"cannot open bundle {path}: {e.strerror}", missing_hint(e)) from e
    try:
        check_pipe_start(f, path)
    except BaseException:
        f.close()
        raise
    return f


@app.command()
def inspect(
    ctx: typer.Context,
    bundle_path: Annotated[Path, typer.Argument(metavar="BUNDLE")],
    as_json: JsonOpt = False,
) -> None:
    """Show a bundle's manifest WITHOUT verifying it (use `verify` for that)."""
    from spk_visor.ota import bundle  # noqa: PLC0415

    with _open_bundle(str(bundle_path)) as f:
        header = bundle.read_header(f)
    payload = header.manifest.payload_json()
    doc = {
        "verified": False,
        "manifest_sha256": header.manifest.payload_sha256,
        "signatures": [k for k, _ in header.manifest.signatures],
        "roots": len(header.roots),
        "manifest": payload,
    }
    from spk_visor.ota.report import inspect_text  # noqa: PLC0415

    _print(ctx, as_json, doc, inspect_text(doc))


@app.command("verify")
def verify_cmd(
    ctx: typer.Context,
    bundle_path: Annotated[Path, typer.Argument(metavar="BUNDLE")],
    root_doc: Annotated[Path, typer.Option("--root", help="Trusted root document.")],
    as_json: JsonOpt = False,
) -> None:
    """Verify a bundle offline against a root: signatures, schema, every blob, the end."""
    from spk_visor.ota import bundle, verify  # noqa: PLC0415
    from spk_visor.ota import roots as ota_roots  # noqa: PLC0415
    from spk_visor.ota.engine import hash_blobs  # noqa: PLC0415
    from spk_visor.trust import roots  # noqa: PLC0415

    trusted, _raw = ota_roots.load_file(root_doc, "root")
    with _open_bundle(str(bundle_path)) as f:
        header = bundle.read_header(f)
        root, _added = roots.chain_from_list(trusted, header.roots)
        v = verify.verify_manifest(header.manifest, root, start=dt.datetime.now(dt.UTC))
        hash_blobs(f, v.manifest)
    doc = {
        "verified": True,
        "manifest_sha256": v.sha256,
        "version": v.manifest.release.version,
        "counter": v.manifest.release.counter,
        "root_version": root.version,
        "keyids": sorted(v.signers),
    }
    _print(
        ctx,
        as_json,
        doc,
        f"OK: {bundle_path} is release {doc['version']} "
        f"(counter {doc['counter']}), signed by {len(v.signers)} release key(s)",
    )


@app.command()
def publish(
    ctx: typer.Context,
    repo: Annotated[
        Path,
        typer.Option(
            "--repo",
            help="Repository directory (made on a first publish; the folder it is in must exist).",
        ),
    ],
    key: KeyOpt,
    channel: Annotated[str, typer.Option("--channel", help="Channel name.")] = "stable",
    bundle_path: Annotated[
        Path | None, typer.Option("--bundle", help="Bundle to publish; without it, re-sign.")
    ] = None,
    revert_to: Annotated[
        str | None,
        typer.Option(
            "--revert-to",
            metavar="MANIFEST_SHA256",
            help="Point the channel at an older published release.",
        ),
    ] = None,
    root_doc: Annotated[list[Path], typer.Option("--root", help="Root documents to publish.")] = [],  # noqa: B006
    expires: Annotated[str, typer.Option("--expires", help="Channel validity.")] = "7d",
    rollout: Annotated[
        float | None, typer.Option("--rollout", min=0, max=100, help="Percent of nodes.")
    ] = None,
    salt: Annotated[str | None, typer.Option("--salt", help="Rollout bucket salt.")] = None,
    passphrase_file: PassFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish into a static repository: blobs, manifest, roots, then the signed channel.

    Run it daily even without a new release: the channel expires (--expires)."""
    from spk_visor.ota.repo import Repo  # noqa: PLC0415

    if bundle_path is not None and revert_to is not None:
        raise UsageError("give --bundle or --revert-to, not both")
    _check_channel(channel)
    r = Repo(repo)
    r.check_place()
    root_envs = [_root_file(p) for p in root_doc]
    signing = _signing_keys(key, passphrase_file)
    newest = _newest_root(r, root_envs)
    if newest is not None:  # without a root anywhere, only the nodes can tell
        where = {f"channel role of root v{newest.version}": newest.keyids("channel")}
        _check_role_keys(signing, key, "a channel key", where)
    sha = revert_to
    if bundle_path is not None:
        sha, _m = r.add_bundle(bundle_path)
    for env in root_envs:
        r.add_root(env)
    payload = r.sign_channel(
        channel,
        signing,
        manifest_sha=sha,
        expires_in=duration(expires),
        percent=rollout,
        salt=salt,
    )
    _print(
        ctx,
        as_json,
        payload,
        f"{repo}: channel {channel} serial {payload['serial']} -> "
        f"{payload['manifest']['version']} ({payload['rollout']['percent']}%), "
        f"expires {payload['expires']}",
    )


def _newest_root(repo: Any, given: list[Any]) -> Any:
    """The newest root among those given and those the repository holds (unverified: this
    only catches a wrong key early; the nodes verify)."""
    from spk_visor.trust import roots  # noqa: PLC0415

    found = [roots.parse_unverified(env) for env in given]
    folder = repo.path("root")
    if folder.is_dir():
        found += [roots.parse_unverified(_root_file(p)) for p in folder.glob("*.root.json")]
    return max(found, key=lambda r: r.version, default=None)


@bundle_app.command("explode")
def bundle_explode(
    ctx: typer.Context,
    bundle_path: Annotated[Path, typer.Argument(metavar="BUNDLE")],
    repo: Annotated[Path, typer.Option("--repo", help="Repository directory.")],
    as_json: JsonOpt = False,
) -> None:
    """Unpack a bundle into a repository's layout (no channel change)."""
    from spk_visor.ota.repo import Repo  # noqa: PLC0415

    r = Repo(repo)
    r.check_place()
    sha, _m = r.add_bundle(bundle_path)
    _print(ctx, as_json, {"manifest_sha256": sha}, f"manifest {sha}")


@bundle_app.command("pack")
def bundle_pack(
    ctx: typer.Context,
    repo: Annotated[Path, typer.Option("--repo", help="Repository directory.")],
    manifest_sha: Annotated[str, typer.Option("--manifest", metavar="SHA256")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle to write.")],
    as_json: JsonOpt = False,
) -> None:
    """Make a bundle from a repository's manifest (for USB or air-gapped nodes)."""
    from spk_visor.ota.repo import Repo, pack  # noqa: PLC0415

    pack(Repo(repo), manifest_sha, out)
    _print(ctx, as_json, {"bundle": str(out)}, f"wrote {out}")


# ---- node side ---------------------------------------------------------------------


@contextmanager
def _as_root() -> Iterator[None]:
    """A user who may not touch the node's OTA state (the lock, /var/lib/spk-visor,
    /opt/smechvisord) made a mistake, not the program: exit 2, run it as root."""
    try:
        yield
    except PermissionError as e:
        if os.geteuid() == 0:
            raise
        raise UsageError(
            f"{e.filename or 'the node OTA state'}: permission denied",
            "the node's OTA state is root's: run it as root (sudo spk-visor ota ...)",
        ) from e


def here_only(ctx: typer.Context) -> None:
    """Node-side commands act on the machine they run on. Given a remote node
    (--ssh, --node, --fleet), they would report or change this machine while the operator
    reads it as the node's: refuse, and say how to reach the node."""
    options = state(ctx).options
    given = [
        flag
        for flag, value in (
            ("--ssh", options.ssh),
            ("--node", options.node),
            ("--fleet", options.fleet),
        )
        if value
    ]
    if given:
        name = ctx.info_name or "status"
        raise UsageError(
            f"`ota {name}` acts on the machine it runs on, not on a node named with "
            f"{' or '.join(given)}: nothing was done",
            f"run it on the node (ssh root@NODE spk-visor ota {name}); from a workstation, "
            "`spk-visor --ssh root@NODE ota push BUNDLE` installs a release",
        )


@contextmanager
def _node(ctx: typer.Context, as_json: bool, quiet: bool = False) -> Iterator[Any]:
    from spk_visor.ota.context import load_context  # noqa: PLC0415

    here_only(ctx)
    from spk_visor.ota.report import Reporter  # noqa: PLC0415

    st = state(ctx, as_json)
    reporter = Reporter(as_json=st.json, quiet=quiet)
    try:
        with _as_root():
            yield load_context(reporter), reporter
    except SpkVisorError as e:
        if not quiet:
            raise
        if st.json:
            st.console.json_line(e.document())
        # -q is the cron form, and cron mails stderr: one line naming the cause, and none
        # when nothing may be done now (outside the rollout, inhibited: every run says so).
        if e.exit_code != ExitCode.NOT_ELIGIBLE:
            from spk_visor.ota.report import one_line  # noqa: PLC0415

            st.console.error(redact("spk-visor: error: " + one_line(e.message, e.hint)))
        raise typer.Exit(int(e.exit_code)) from e
    finally:
        reporter.close()


def _outcome(
    ctx: typer.Context,
    octx: Any,
    reporter: Any,
    code: ExitCode,
    doc: dict[str, Any],
    *,
    quiet: bool,
    unchanged_77: bool,
) -> None:
    """End an apply or pull: the result event under --json; else the outcome in words,
    on stdout for success and on stderr otherwise. Under -q only a refusal, failure,
    rollback or a staged base says anything: one line on stderr."""
    from spk_visor.ota import engine, report  # noqa: PLC0415

    if code == ExitCode.OK and unchanged_77 and not doc.get("changed", True):
        code = ExitCode.UNCHANGED
    reporter.result(int(code), **doc)
    console = state(ctx).console
    success = code in (ExitCode.OK, ExitCode.UNCHANGED)
    if not reporter.as_json and not quiet:
        text = report.outcome(int(code), doc, engine.status(octx))
        (console.print if success else console.error)(text)
    elif quiet and not success and code != ExitCode.NOT_ELIGIBLE:
        # Also beside --json (its result event is on stdout): cron mails stderr.
        text = report.outcome(int(code), doc, engine.status(octx))
        console.error(redact(f"spk-visor: {text}"))
    if code != ExitCode.OK:
        raise typer.Exit(int(code))


def _finish(reporter: Any, code: ExitCode, unchanged_77: bool = False, **fields: Any) -> None:
    if code == ExitCode.OK and unchanged_77 and not fields.get("changed", True):
        code = ExitCode.UNCHANGED
    reporter.result(int(code), **fields)
    if code != ExitCode.OK:
        raise typer.Exit(int(code))


BundleArg = Annotated[
    str, typer.Option("--bundle", "-b", metavar="FILE|-", help="Bundle; - reads stdin.")
]
DowngradeOpt = Annotated[
    bool, typer.Option("--allow-downgrade", help="Install a release older than the installed one.")
]
AssumeTimeOpt = Annotated[
    bool, typer.Option("--assume-time", help="Trust this clock even if behind the clock floor.")
]


@app.command()
def check(
    ctx: typer.Context,
    bundle_path: BundleArg,
    allow_downgrade: DowngradeOpt = False,
    assume_time: AssumeTimeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Dry run: every check and the plan, with zero writes."""
    from spk_visor.ota import engine  # noqa: PLC0415

    with _node(ctx, as_json) as (octx, reporter), _open_bundle(bundle_path) as f:
        plan = engine.check(octx, f, allow_downgrade=allow_downgrade, assume_time=assume_time)
        doc = plan.to_doc()
        if reporter.as_json:
            reporter.result(0, **doc)
        else:
            from spk_visor.ota.report import check_text  # noqa: PLC0415

            state(ctx).console.print(check_text(doc))


@app.command()
def apply(
    ctx: typer.Context,
    bundle_path: BundleArg,
    detach: Annotated[
        bool, typer.Option("--detach", help="Return once the worker started.")
    ] = False,
    allow_downgrade: DowngradeOpt = False,
    assume_time: AssumeTimeOpt = False,
    manual_commit: Annotated[
        bool,
        typer.Option(
            "--manual-commit", help="Hold the new daemon in probation until `ota commit`."
        ),
    ] = False,
    unchanged_77: Unchanged77 = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Verify a bundle into the node's store, then apply it (exit 4: reboot for the base;
    5: rolled back; 3: refused, nothing changed)."""
    from spk_visor.ota import engine  # noqa: PLC0415

    opts = engine.ApplyOptions(
        mode="push",
        allow_downgrade=allow_downgrade,
        assume_time=assume_time,
        manual_commit=manual_commit,
        detach=detach,
    )
    with _node(ctx, as_json, quiet) as (octx, reporter), _open_bundle(bundle_path) as f:
        code, plan = engine.apply_stream(octx, f, opts)
        doc = {"changed": plan.changes, "detached": detach, **plan.to_doc()}
        _outcome(ctx, octx, reporter, code, doc, quiet=quiet, unchanged_77=unchanged_77)


@app.command()
def pull(
    ctx: typer.Context,
    channel: Annotated[
        str | None,
        typer.Option(
            "--channel", help="Channel to follow.", show_default="ota.conf's channel, else stable"
        ),
    ] = None,
    jitter: Annotated[
        float,
        typer.Option("--jitter", min=0, help="Sleep up to this many seconds first (not on a TTY)."),
    ] = 0,
    apply_daemon: Annotated[
        bool | None,
        typer.Option(
            "--apply-daemon/--no-apply-daemon",
            help="Swap the daemon live.",
            show_default="ota.conf's apply_daemon, else true",
        ),
    ] = None,
    stage_base: Annotated[
        bool | None,
        typer.Option(
            "--stage-base/--no-stage-base",
            help="Stage the base image in the other slot.",
            show_default="ota.conf's stage_base, else false",
        ),
    ] = None,
    unchanged_77: Unchanged77 = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fetch and apply the channel's release from the repository in ota.conf's base_urls
    (cron; with none configured this node does not pull: exit 8)."""
    from spk_visor.ota import pull as pull_mod  # noqa: PLC0415

    _check_channel(channel)
    with _node(ctx, as_json, quiet) as (octx, reporter):
        opts = pull_mod.PullOptions(
            channel=channel,
            jitter=jitter,
            apply_daemon=apply_daemon,
            stage_base=stage_base,
            interactive=sys.stdin.isatty(),
        )
        code, doc = pull_mod.run(octx, opts)
        _outcome(ctx, octx, reporter, code, doc, quiet=quiet, unchanged_77=unchanged_77)


@app.command()
def status(
    ctx: typer.Context,
    follow: Annotated[
        bool, typer.Option("--follow", help="Follow a running update to its end.")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for a running update; print only the end state.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Journal, installed release, floor, staged base; exit code of the last update with --wait."""
    from spk_visor.ota import engine  # noqa: PLC0415
    from spk_visor.ota.context import load_context  # noqa: PLC0415
    from spk_visor.ota.report import Reporter  # noqa: PLC0415

    here_only(ctx)
    st = state(ctx, as_json)
    # --wait shows only the end state; --follow shows each phase as it happens.
    reporter = Reporter(as_json=st.json, quiet=not follow)
    with _as_root():
        octx = load_context(reporter if follow else None)
        code = ExitCode.OK
        try:
            if follow or wait:
                code = engine.follow(octx)
        finally:
            reporter.close()
        doc = engine.status(octx)
    if st.json:
        st.console.json(doc)
    else:
        from spk_visor.ota.report import status_text  # noqa: PLC0415

        st.console.print(status_text(doc))
    if code != ExitCode.OK:
        raise typer.Exit(int(code))


def _locked_action(ctx: typer.Context, as_json: bool, name: str) -> None:
    from spk_visor.ota import engine  # noqa: PLC0415

    with _node(ctx, as_json) as (octx, reporter):
        code = engine.manual(octx, name)
        _finish(reporter, code, action=name)
        if not reporter.as_json:
            state(ctx).console.print(f"{name}: done")


@app.command()
def commit(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Commit a daemon release held in probation (--manual-commit)."""
    _locked_action(ctx, as_json, "commit")


@app.command()
def rollback(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Go back to the previous daemon release (never below the floor)."""
    _locked_action(ctx, as_json, "rollback")


@app.command()
def discard(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Cancel a staged base image (the next boot stays on the current slot)."""
    _locked_action(ctx, as_json, "discard")


@app.command()
def recover(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Finish or undo what a crash interrupted (every OTA command, boot-check at boot
    included, does it first; safe to run any time)."""
    from spk_visor.ota import engine, journal  # noqa: PLC0415

    with _node(ctx, as_json) as (octx, _reporter):
        with journal.locked(octx.paths, "recover"):
            actions = engine.recover_all(octx)
        _print(ctx, as_json, {"actions": actions}, "\n".join(actions) or "nothing to recover")


@app.command("boot-check")
def boot_check(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """At boot (the spk-visor-ota service): recover interrupted work, then commit a trial
    base slot that is healthy, or record the failed trial (exit 5)."""
    _locked_action(ctx, as_json, "boot-check")


@app.command()
def history(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Last N events.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Every OTA decision on this node, oldest first."""
    from spk_visor.ota.context import load_context  # noqa: PLC0415

    here_only(ctx)
    events = load_context().history.read(limit)

    def word(value: Any) -> str:
        # Not every event has every column: say so in words, not with a blank cell.
        return "none" if value is None or value == "" else str(value)

    rows = [
        [
            word(e.get("time")),
            word(e.get("event")),
            word(e.get("manifest") and str(e["manifest"])[:12]),
            word(e.get("version")),
            word(e.get("exit_code")),
            word(e.get("downtime_ms")),
        ]
        for e in events
    ]
    text = (
        table(["time", "event", "manifest", "version", "exit", "downtime ms"], rows)
        if rows
        else "no OTA history on this node yet"
    )
    _print(ctx, as_json, events, text)


@app.command("verify-installed")
def verify_installed(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Re-hash the running release tree and the active slot against their manifests."""
    from spk_visor.ota import engine  # noqa: PLC0415

    with _node(ctx, as_json) as (octx, _reporter):
        problems = engine.verify_installed(octx)
    _print(
        ctx,
        as_json,
        {"ok": not problems, "problems": problems},
        "\n".join(problems) or "installed release verifies",
    )
    if problems:
        raise typer.Exit(int(ExitCode.REFUSED))


@app.command()
def push(
    ctx: typer.Context,
    bundle_path: Annotated[
        Path,
        typer.Argument(
            metavar="BUNDLE",
            help="The .spkb file; a pipe (<(curl URL)) or - (stdin) is first read into a "
            "private temporary file.",
        ),
    ],
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel",
            "-p",
            min=1,
            help=(
                "Nodes applying at once after the canary; up to twice as many may be"
                " receiving the bundle."
            ),
        ),
    ] = 4,
    canary: Annotated[
        bool, typer.Option("--canary/--no-canary", help="First node alone first.")
    ] = True,
    stop_on_failure: Annotated[
        bool, typer.Option("--stop-on-failure", help="Start no more nodes after a failure.")
    ] = False,
    allow_downgrade: DowngradeOpt = False,
    assume_time: AssumeTimeOpt = False,
    remote_command: Annotated[
        str | None,
        typer.Option(
            "--remote-command",
            metavar="COMMAND",
            help="spk-visor on the nodes, e.g. /opt/spk-visor/bin/spk-visor.",
            show_default="the node's remote_command in config.toml, else found on the node: "
            "its PATH, /usr/bin, /usr/local/bin, /usr/sbin, /usr/local/sbin, "
            "/opt/spk-visor/bin, ~/.local/bin",
        ),
    ] = None,
    as_json: JsonOpt = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            callback=_record_quiet,
            help="For cron: no table; only one line on stderr per node that failed or "
            "needs a reboot, naming it and what to do (also printed without -q).",
        ),
    ] = False,
) -> None:
    """Stream a bundle over SSH to --ssh/--node/--fleet nodes; each verifies and applies it."""

    from spk_visor.ota import push as push_mod  # noqa: PLC0415
    from spk_visor.ota import spool  # noqa: PLC0415
    from spk_visor.ota.bundle import check_is_bundle  # noqa: PLC0415

    st = state(ctx, as_json)
    if str(bundle_path) != spool.STDIN:  # not ./-: stdin's start is checked as it is read
        check_is_bundle(bundle_path)  # once here, rather than streamed to every node
    settings = st.settings
    targets = push_mod.targets_from_settings(settings)
    # A pipe (<(curl ...), /dev/stdin, -) is read once into a private file, checked, and
    # gone when the command ends (it has no name): every node gets it from the start.
    bundle_path = ctx.with_resource(spool.as_file(bundle_path))
    extra = [
        a
        for a, on in (("--allow-downgrade", allow_downgrade), ("--assume-time", assume_time))
        if on
    ]
    results = push_mod.push(
        bundle_path,
        targets,
        parallel=parallel,
        canary=canary,
        stop_on_failure=stop_on_failure,
        remote_command=_split_command(remote_command),
        apply_args=extra,
        timeout=settings.timeout,
        accept_new=settings.accept_new,
        show_progress=not st.json and not quiet and st.console.err_is_tty,
    )
    docs = [r.to_doc() for r in results]
    if st.json:
        st.console.json(docs)
    elif not quiet:
        st.console.print(push_mod.summary_table(results))
    for line in push_mod.attention_lines(results):
        st.console.error(redact(f"spk-visor: {line}"))
    worst = push_mod.overall_exit(results)
    if worst != ExitCode.OK:
        raise typer.Exit(int(worst))


def _check_channel(name: str | None) -> None:
    from spk_visor.ota.nodeconf import channel_problem  # noqa: PLC0415

    why = None if name is None else channel_problem(name)
    if why is not None:
        raise UsageError(f"--channel {why}", "for example --channel stable")


def _split_command(text: str | None) -> list[str] | None:
    import shlex  # noqa: PLC0415

    if not text:
        return None
    try:
        return shlex.split(text) or None
    except ValueError as e:
        raise UsageError(f"--remote-command {text!r}: {e}", "fix its quoting") from e


def register_aliases(root: typer.Typer) -> None:
    """`entire-system-upgrade`: the original tool's name for an update, now `ota pull`."""
    root.command(
        "entire-system-upgrade",
        help="Alias of `ota pull`: fetch and apply the channel's release from the repository "
        "in /etc/spk-visor/ota.conf.",
    )(pull)

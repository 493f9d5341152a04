"""Python on the node: spk-visor from wheels, and the smechvisord release tree.

spk-visor and its dependencies are installed from wheels: the project's own, built from
the checkout, and its dependencies' cp311 manylinux wheels (pip's download cache serves
them after the first build). pip runs on the build host and writes into the image with
--target; the image never gets a pip. Bytecode is compiled by the image's own python,
in a chroot, with checked-hash invalidation, so the .pyc files are the same bytes at
every build and stay valid on a read-only root.

The daemon's release tree has the layout of `make dist` (docs/release-tree.md): it is
what the node runs until the first OTA swap, and what a node without a data partition
runs at all.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from spk_visor.deploy import shim_iso
from spk_visor.errors import ConfigError, SpkVisorError
from spk_visor.image import nodefiles
from spk_visor.install import runner

CLI_LIB = "usr/lib/spk-visor/python"
OPT = "opt/smechvisord"
NODE_PYTHON = "/usr/bin/python3"
_TIMEOUT_S = 1800
Progress = Callable[[str], None]


class ImageBuildError(SpkVisorError):
    """A build step failed (a tool's exit status, with its last words)."""


def run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    return runner.run_checked(argv, ImageBuildError, timeout=_TIMEOUT_S, env=env, cwd=cwd)


def chroot(root: Path, argv: list[str], env: dict[str, str] | None = None) -> str:
    # A fixed hash seed: bytecode of set and frozenset constants is then the same bytes.
    base = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C.UTF-8",
        "HOME": "/root",
        "PYTHONHASHSEED": "0",
    }
    return run(["chroot", str(root), *argv], env={**base, **(env or {})})


def pip_command() -> list[str]:
    """pip of the interpreter running spk-visor (a venv's or the system's)."""
    import sys  # noqa: PLC0415

    return [sys.executable, "-m", "pip"]


def build_wheels(source: Path, wheels: Path, progress: Progress) -> list[Path]:
    """spk-visor's wheel from `source` and its dependencies' cp311 wheels, into `wheels`."""
    wheels.mkdir(parents=True, exist_ok=True)
    progress(f"building the spk-visor wheel from {source}")
    pip = pip_command()
    for old in wheels.glob("spk_visor-*.whl"):
        old.unlink()
    # From a clean copy: an in-tree build reuses the checkout's build/ directory, where
    # files deleted from the source live on (and would be in the wheel), and leaves
    # build/ and *.egg-info behind. Build isolation: the backend pyproject.toml asks for.
    with tempfile.TemporaryDirectory(prefix="spk-wheel-") as tmp:
        clean = Path(tmp) / "src"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in ("spk_visor", "smechvisord"):
            shutil.copytree(source / name, clean / name, ignore=ignore)
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (source / name).is_file():
                shutil.copyfile(source / name, clean / name)
        run([*pip, "wheel", "-q", "--no-deps", "-w", str(wheels), str(clean)])
    progress("collecting dependency wheels (cp311, manylinux; pip's cache first)")
    argv = [*pip, "download", "-q", "--only-binary=:all:", "-d", str(wheels)]
    argv += ["--implementation", "cp", "--python-version", "3.11"]
    argv += ["--abi", "cp311", "--abi", "abi3", "--abi", "none"]
    for platform in shim_iso._pip_platforms():
        argv += ["--platform", platform]
    run([*argv, *shim_iso._project_dependencies()])
    return sorted(wheels.glob("*.whl"))


def install_cli(root: Path, wheels: Path, progress: Progress) -> None:
    """spk-visor and its dependencies into CLI_LIB, and /usr/bin/spk-visor."""
    target = root / CLI_LIB
    progress(f"installing spk-visor from wheels into /{CLI_LIB}")
    argv = [*pip_command(), "install", "-q", "--no-index", "--find-links", str(wheels)]
    argv += ["--no-compile", "--only-binary=:all:", "--target", str(target)]
    argv += ["--implementation", "cp", "--python-version", "3.11"]
    argv += ["--abi", "cp311", "--abi", "abi3", "--abi", "none"]
    for platform in shim_iso._pip_platforms():
        argv += ["--platform", platform]
    run([*argv, "spk-visor"], env={"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    # pip's console scripts name the build host's interpreter: the launcher replaces them.
    shutil.rmtree(target / "bin", ignore_errors=True)
    # Installer records hold no content, but name the build host's pip ("INSTALLER").
    for record in target.glob("*.dist-info/INSTALLER"):
        record.write_text("spk-visor image build\n")
    strip_extensions(target)
    launcher = root / "usr/bin/spk-visor"
    launcher.write_text(nodefiles.CLI_LAUNCHER.format(lib=f"/{CLI_LIB}"))
    launcher.chmod(0o755)
    compile_tree(root, f"/{CLI_LIB}")


def strip_extensions(target: Path) -> None:
    """Symbol tables off the wheels' extension modules (zstandard: 12 MB -> 1 MB).

    Bundled libraries (*.libs) are left alone: auditwheel patched their headers.
    """
    strip = shutil.which("strip")
    if strip is None:
        raise ConfigError("strip not found", "install the Debian package binutils")
    files = [
        str(so)
        for so in sorted(target.rglob("*.so"))
        if so.is_file() and not so.is_symlink() and not so.parent.name.endswith(".libs")
    ]
    if files:
        run([strip, "--strip-unneeded", *files])


def compile_tree(root: Path, path: str) -> None:
    """Bytecode for `path` (inside the image) by the image's python, checked-hash."""
    chroot(
        root,
        [NODE_PYTHON, "-m", "compileall", "-q", "--invalidation-mode", "checked-hash", path],
    )


def tree_digest(tree: Path) -> str:
    """sha256 over a tree's paths, modes and contents, in sorted order."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            rel = path.relative_to(tree).as_posix()
            if path.is_symlink():
                digest.update(f"L {rel} {os.readlink(path)}\0".encode())
                continue
            digest.update(f"F {rel} {path.stat().st_mode & 0o777:o}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def daemon_tree_from_package(package: Path, dest: Path, version: str) -> None:
    """The `make dist` layout from the smechvisord package at `package`."""
    lib = dest / "lib" / "smechvisord"
    shutil.copytree(package, lib, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (lib / "version.py").write_text(f'"""Release {version}."""\n\nVERSION = {version!r}\n')
    launcher = dest / "bin" / "smechvisord"
    launcher.parent.mkdir(parents=True)
    launcher.write_text(nodefiles.DAEMON_LAUNCHER)
    launcher.chmod(0o755)
    (dest / "VERSION").write_text(f"{version}\n")


def install_daemon(root: Path, tree: Path | None, package: Path, version: str) -> str:
    """The release tree at /opt/smechvisord/releases/<version>-<digest8>, `current` -> it.

    `tree` is a release tree the operator made (`make dist`); None builds one from
    `package`. Returns the release id.
    """
    releases = root / OPT / "releases"
    staging = releases / ".staging"
    if tree is not None:
        if not (tree / "bin" / "smechvisord").is_file():
            raise ConfigError(f"{tree} has no bin/smechvisord", "pass a tree made by make dist")
        shutil.copytree(tree, staging, symlinks=True)
        version_file = staging / "VERSION"
        if version_file.is_file():
            version = version_file.read_text().strip() or version
    else:
        daemon_tree_from_package(package, staging, version)
        compile_tree(root, f"/{OPT}/releases/.staging/lib")
    rid = f"{version}-{tree_digest(staging)[:8]}"
    final = releases / rid
    os.rename(staging, final)
    # Read-only, as OTA leaves every release tree it installs (swap.py).
    for dirpath, dirnames, filenames in os.walk(final):
        for name in filenames + dirnames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                path.chmod(path.stat().st_mode & ~0o222)
    final.chmod(0o555)
    (root / OPT / "current").symlink_to(f"releases/{rid}")
    return rid


def check_cli(root: Path) -> str:
    """`spk-visor --version` under the image's python: the install is complete."""
    try:
        return chroot(root, ["/usr/bin/spk-visor", "--version"]).strip()
    except ImageBuildError as e:
        raise ImageBuildError(f"spk-visor does not run in the image: {e}") from e

"""Runs once at shim boot: prove the runtime imports, then say whether the receiver exists.

Exit 0: ready and the receiver is present; 2: ready but no receiver in this build;
anything else: the runtime is broken (the traceback is on the console).
"""

import importlib.util
import platform
import sys

import cryptography
import spake2  # noqa: F401
import zstandard  # noqa: F401
from cryptography.hazmat.primitives.asymmetric import ed25519

import spk_visor  # noqa: F401
from smechvisord.version import VERSION

# The Rust extension loads only on first use; libgcc_s missing shows up here.
ed25519.Ed25519PrivateKey.generate()
print(
    f"SPK-SHIM ready python={platform.python_version()} spk_visor={VERSION} "
    f"cryptography={cryptography.__version__}",
    flush=True,
)
# /init runs `python3 -m spk_visor deploy receive`: both the CLI and the receiver must be in.
WANTED = ("spk_visor.deploy.receiver", "spk_visor.commands.deploy")
sys.exit(0 if all(importlib.util.find_spec(m) for m in WANTED) else 2)

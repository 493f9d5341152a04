"""What may be trusted, decided from bytes and a reference time (design/ota.md).

Pure: nothing here opens a file, reads the clock or the environment, or touches the
network; callers read the bytes, take the time once, and pass both in. The OTA and deploy
layers keep the file access (spk_visor.ota.keys, spk_visor.ota.roots, spk_visor.ota.verify).
The only third-party import is `cryptography`. tests/unit/test_trust_pure.py holds this.

Modules, one job each:
  keys       ed25519 keys, key ids, key material parsed from bytes
  dsse       signature envelopes (DSSE) and role thresholds
  roots      root documents: roles, expiry, rotation chains
  manifest   the manifest schema and its path/mode/symlink rules
  verify     the verification policy: channel, manifest, counter floor, blob hashes
"""

"""Signed over-the-air updates (design/ota.md).

One object model, two transports: root documents, a channel pointer, a signed manifest and
content-addressed blobs, carried either in one `.spkb` bundle (push) or as files of a static
repository (pull). The same verifier serves both: spk_visor.trust, pure functions over
bytes and a reference time; the modules here read and write the files around it.

Modules, one job each:
  keys       ed25519 key files
  roots      the node's trust store (root files)
  bundle     the .spkb framing
  build      build side: trees and images into blobs, manifests, bundles
  repo       the static pull repository (publish, channel documents)
  verify     the verification policy bound to this host (platform, version, free space)
  nodeconf   node paths and /etc/spk-visor/ota.conf
  durable    fsync discipline, the symlink flip, crash points for tests
  journal    state.json, floor.json, history.jsonl and the lock
  store      the node's private blob store
  swap       the daemon class: stage, preflight, switch, probation, rollback
  slots      the base class: A/B slots, grubenv, boot-check
  fetch      resumable HTTP downloads from mirrors
  pull       the cron path
  push       the workstation path over SSH
  engine     check/apply/recover orchestration
"""

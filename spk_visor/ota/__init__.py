"""Signed over-the-air updates (design/ota.md).

One object model, two transports: root documents, a channel pointer, a signed manifest and
content-addressed blobs, carried either in one `.spkb` bundle (push) or as files of a static
repository (pull). The same verifier serves both.

Modules, one job each:
  keys       ed25519 key files, key ids
  dsse       signature envelopes and thresholds
  roots      root documents, rotation, the node's trust store
  manifest   the manifest schema and its path/mode rules
  bundle     the .spkb framing
  build      build side: trees and images into blobs, manifests, bundles
  repo       the static pull repository (publish, channel documents)
  verify     the verification policy shared by push and pull
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

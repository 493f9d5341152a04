"""Network deploy (design/deploy.md): a blank machine booted from the Deploy Shim ISO
shows a short code; a donor that holds the code streams a signed release over a
SPAKE2-authenticated, encrypted channel; the target verifies and installs it to disk.

Modules, one job each:
  code        the NN-SSSSS code: nameplate, secret, normalisation, the SPAKE2 password
  channel     hello, SPAKE2, HKDF, key confirmation, length-prefixed AEAD records
  messages    message types and the strict per-side state machine
  discovery   the UDP announcement (public fields only) and the donor's listener
  inventory   block devices, eligibility, the HELLO inventory
  install     plan validation and the install to disk (phases, payload, config); the
              disk itself is prepared by spk_visor.install.disk and .layout
  bootloader  GRUB for BIOS (grub-mkimage + grub-bios-setup) and the EFI fallback BOOTX64.EFI
  receiver    the target side session loop (codes, attempts, BUSY, resume)
  donor       the donor side, one session per code, several in parallel
  shim_iso    building the Deploy Shim ISO from shim/
"""

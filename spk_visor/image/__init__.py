"""The SmechVisor base image: a raw ext4 root for one A/B slot, built from Debian 12.

    build      inputs -> cache key; a cache hit is the whole build
    sources    the host's apt sources for the suite (no mirror named in this repository)
    rootfs     mmdebstrap, then the node's files, services and contracts, pruning, sealing
    pyenv      spk-visor from wheels, and the smechvisord release tree
    nodefiles  the text of every file the builder writes into the image
    ext4       a reproducible mkfs.ext4 -d of the staged tree

`spk-visor image build` (commands/image.py) and `make image` drive it; docs/image.md
is the operator's page.
"""

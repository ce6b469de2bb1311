#!/bin/bash -e
# This stage builds on the one before it in STAGE_LIST (pi-gen's stage2, Raspberry Pi OS Lite):
# it starts from a copy of that stage's root filesystem, unless a rerun finds its own.
if [ ! -d "${ROOTFS_DIR}" ]; then
	copy_previous
fi

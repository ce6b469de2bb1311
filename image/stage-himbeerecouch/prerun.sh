#!/bin/bash -e
# No image may hold a password: refuse a server URL with user:password@ before anything is built
# (the package's debconf question refuses it too, but only with a message, so as not to fail an
# installation by hand).
case "${HIMBEERECOUCH_SERVER:-}" in
	*://*@*)
		echo "himbeerecouch: the server URL carries user:password@: no image may hold a password." >&2
		echo "himbeerecouch: give the URL alone; each Pi logs in with its own credentials, made at first boot." >&2
		exit 1 ;;
esac
# This stage builds on the one before it in STAGE_LIST (pi-gen's stage2, Raspberry Pi OS Lite):
# it starts from a copy of that stage's root filesystem, unless a rerun finds its own.
if [ ! -d "${ROOTFS_DIR}" ]; then
	copy_previous
fi

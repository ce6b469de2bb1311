#!/bin/bash -e
# The boot file: /boot/firmware/himbeerecouch.txt, which pi-gen's export copies to the FAT
# partition, so that every card can be given its settings on any computer before first boot.
# The daemon reads it through its `boot_config` key (that path by default).
#
# The server preseeded through debconf (00-install-package/00-debconf) is what the package
# wrote to /var/rspby/server: it becomes the boot file's `server` line, and leaves /var/rspby
# and the debconf database, so that the image holds no state in /var/rspby and a later
# upgrade of the package does not write it back there.

boot_file="${ROOTFS_DIR}/boot/firmware/himbeerecouch.txt"
server_file="${ROOTFS_DIR}/var/rspby/server"

server=""
if [ -f "${server_file}" ]; then
	server="$(head -n 1 "${server_file}")"
fi
case "${server}" in
	*://*@*)
		echo "himbeerecouch: the server URL carries user:password@: no image may hold a password." >&2
		echo "himbeerecouch: give the URL alone; each Pi logs in with its own credentials, made at first boot." >&2
		exit 1
		;;
esac

install -d "${ROOTFS_DIR}/boot/firmware"
{
	cat files/himbeerecouch.txt
	if [ -n "${server}" ]; then
		printf '\n# Every card of this image (pi-gen build, HIMBEERECOUCH_SERVER):\nserver = %s\n' "${server}"
	fi
} > "${boot_file}.new"
chmod 0644 "${boot_file}.new"
mv "${boot_file}.new" "${boot_file}"
log "himbeerecouch: boot file /boot/firmware/himbeerecouch.txt${server:+ with server = ${server}}"

rm -f "${server_file}" "${ROOTFS_DIR}/var/rspby/.server.debconf"
on_chroot << EOF
echo "himbeerecouch himbeerecouch/server string" | debconf-set-selections
EOF

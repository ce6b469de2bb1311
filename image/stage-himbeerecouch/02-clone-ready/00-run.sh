#!/bin/bash -e
# Clone readiness: the image is flashed to many cards, and each Pi must come up as itself.
# It holds no device's credentials, no state of any device and no server secret: the
# first-boot unit (himbeerecouch-firstboot.service) makes each card's credentials from its own
# MAC address and CPU serial. pi-gen's own first-boot handling does the rest (an
# "uninitialized" machine-id, SSH host keys made at first boot, the user rename); this stage
# leaves it alone.

state_dir="${ROOTFS_DIR}/var/rspby"

# /var/rspby holds nothing but what systemd-tmpfiles makes (the directory itself): whatever
# else is there (credentials made by running himbeerecouch-creds in the chroot, last-known
# code, a checkpoint, a server file) belongs to no card of this image.
if [ -d "${state_dir}" ]; then
	leftovers="$(find "${state_dir}" -mindepth 1 -maxdepth 1 -printf '%f ')"
	if [ -n "${leftovers}" ]; then
		log "himbeerecouch: removing device state from /var/rspby: ${leftovers}"
		find "${state_dir}" -mindepth 1 -delete
	fi
fi
# The login prompt's credentials snippet is written at boot, for the card that boots.
rm -f "${ROOTFS_DIR}/etc/issue.d/himbeerecouch.issue"

# No password in the settings that every card shares.
for file in "${ROOTFS_DIR}/etc/himbeerecouch/himbeerecouch.conf" "${ROOTFS_DIR}/boot/firmware/himbeerecouch.txt"; do
	if [ -f "${file}" ] && grep -Eq '^[[:space:]]*server[[:space:]]*[=:].*://[^/[:space:]]*@' "${file}"; then
		echo "himbeerecouch: ${file#"${ROOTFS_DIR}"} has a server URL with user:password@: no image may hold a password." >&2
		exit 1
	fi
done

# Both units start at every boot: the credentials first, then the daemon.
on_chroot << EOF
systemctl is-enabled himbeerecouch-firstboot.service himbeerecouch.service
EOF
log "himbeerecouch: clone-ready (/var/rspby empty, no credentials, units enabled)"

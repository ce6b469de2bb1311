#!/bin/bash -e
# Installs the himbeerecouch package. pi-gen installs packages from archives only, so the .deb
# is copied into the rootfs, installed with apt-get in the chroot (apt brings its dependencies
# from the image's archives) and deleted again.
#
# Which .deb: HIMBEERECOUCH_DEB (exported by pi-gen's config), else the one in files/.

deb="${HIMBEERECOUCH_DEB:-}"
if [ -z "$deb" ]; then
	shopt -s nullglob
	candidates=(files/himbeerecouch_*_all.deb)
	shopt -u nullglob
	if [ "${#candidates[@]}" -gt 1 ]; then
		echo "himbeerecouch: several packages in $PWD/files (${candidates[*]}): keep one, or set HIMBEERECOUCH_DEB" >&2
		exit 1
	fi
	deb="${candidates[0]:-}"
fi
if [ -z "$deb" ] || [ ! -f "$deb" ]; then
	echo "himbeerecouch: no package to install${deb:+ ($deb does not exist)}." >&2
	echo "himbeerecouch: build it with 'make deb' in the himbeerecouch checkout (dist/himbeerecouch_<version>_all.deb)," >&2
	echo "himbeerecouch: then export HIMBEERECOUCH_DEB=/path/to/it in pi-gen's config, or copy it to $PWD/files/." >&2
	exit 1
fi

# Not in /tmp: on_chroot mounts a fresh tmpfs over the chroot's /tmp on its first call in a
# stage, which would hide a file copied there before.
inside=/var/tmp/himbeerecouch-install
rm -rf "${ROOTFS_DIR:?}${inside}"
trap 'rm -rf "${ROOTFS_DIR:?}${inside}"' EXIT
install -d -m 0755 "${ROOTFS_DIR}${inside}"
install -m 0644 "$deb" "${ROOTFS_DIR}${inside}/"
name="$(basename "$deb")"
log "himbeerecouch: installing $name"

on_chroot << EOF
DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=3 install -y "${inside}/${name}"
dpkg-query -W -f='himbeerecouch: installed \${Package} \${Version}\n' himbeerecouch
EOF

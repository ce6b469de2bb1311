# Sourced by scripts/system-test and scripts/sd-image: the Debian packages that building and
# booting images need, and binfmt_misc for arm64 binaries (the Pi's root is made on this
# machine under qemu-user). Both need root.

# install_packages PACKAGE...: those not installed yet, with apt-get.
install_packages() {
  local missing=() package
  for package in "$@"; do
    dpkg-query -W -f '${Status}\n' "$package" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$package")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "$(basename "$0"): installing ${missing[*]}" >&2
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

# Foreign binaries run through binfmt_misc with qemu-user-static's handlers, which the F flag
# keeps usable inside a chroot. Without systemd as init nothing registers them.
enable_arm64_binfmt() {
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || update-binfmts --enable >/dev/null 2>&1 || true
  fi
  if ! arch-test arm64 >/dev/null 2>&1; then
    echo "$(basename "$0"): this machine cannot run arm64 binaries through binfmt (qemu-user-static)" >&2
    return 1
  fi
}

# make deb's own tools and the image builders' (image/build-test-image, image/build-sd-image).
IMAGE_TOOLS=(build-essential devscripts debhelper dh-python python3-all python3-setuptools python3-pip git
             mmdebstrap qemu-user-static binfmt-support arch-test libcap2-bin rsync quilt
             e2fsprogs dosfstools mtools fdisk bmap-tools xz-utils curl)

# Shortcuts; the scripts are the real entry points (README.md).
.PHONY: demo test bench ci soak

demo:
	scripts/demo

test:
	scripts/test

# The fault-injection tier (tests/faults/) with ten times the cycles and examples of CI.
soak:
	HIMBEERECOUCH_SOAK=1 scripts/test tests/faults

bench:
	scripts/bootstrap && .venv/bin/python bench/latency.py && .venv/bin/python bench/memory.py && .venv/bin/python bench/idle.py && .venv/bin/python bench/startup.py && .venv/bin/python bench/command.py

ci:
	.ci/run

# Debian package (README.md, "Debian package").
.PHONY: deb pycouchdb-deb package-test

# dist/himbeerecouch_<version>_all.deb and the source package (.dsc, .tar.xz), with
# dpkg-buildpackage -us -uc; installs the build dependencies first when they are missing.
deb:
	scripts/build-deb

# dist/python3-pycouchdb_<version>_all.deb from the same pycouchdb release (vendor/pycouchdb/), with stdeb,
# for sites that prefer a system-wide pycouchdb (it then wins over the .deb's private copy).
pycouchdb-deb:
	scripts/build-pycouchdb-deb

# The package tier: build, lintian, install into clean Debian roots, piuparts, boot test.
package-test:
	scripts/package-test

# SD card images (README.md, "Flashing a Raspberry Pi" and "Raspberry Pi OS image with pi-gen").
.PHONY: image system-test sd-image

# build/image/amd64: image/stage-himbeerecouch applied by image/run-stage to a Debian root that
# stands in for Raspberry Pi OS Lite (a real one is built with pi-gen and image/config). Root.
image: deb
	image/build-test-image

# dist/himbeerecouch-<version>-raspi-arm64.img.xz (+ .sha256, .img.bmap, .rpi-imager.json): the prebuilt SD card
# image for Raspberry Pi 3/4/400/Zero 2 W, from Debian's archive (image/build-sd-image). Root.
sd-image:
	scripts/sd-image

# The system tier: the SD card image checked and booted under QEMU (aarch64), the stage. Root.
system-test:
	scripts/system-test

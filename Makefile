# Shortcuts; the scripts are the real entry points (README.md).
.PHONY: demo test bench ci

demo:
	scripts/demo

test:
	scripts/test

bench:
	scripts/bootstrap && .venv/bin/python bench/latency.py

ci:
	.ci/run

# Debian package (README.md, "Debian package").
.PHONY: deb

# dist/himbeerecouch_<version>_all.deb, with dpkg-buildpackage -us -uc -b.
deb:
	scripts/build-deb

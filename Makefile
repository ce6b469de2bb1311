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

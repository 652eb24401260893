# pmlmd: build and check the Debian package (the packaging is in packaging/debian/).
#
#   make deb      build dist/pmlmd_<version>_all.deb from a clean copy of this tree
#   make lintian  run lintian on dist/*.deb; fails on any error or warning
#   make clean    remove dist/ and build/
#
# Build packages (Debian 12): debhelper dh-python pybuild-plugin-pyproject python3-all
# python3-setuptools dpkg-dev, and lintian for `make lintian`.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.PHONY: deb lintian clean

DIST := dist
# The Debian version (debian/changelog) and the upstream one (pyproject.toml) must agree.
DEB_VERSION := $(shell dpkg-parsechangelog -l packaging/debian/changelog -S Version 2>/dev/null)
DEB_UPSTREAM := $(firstword $(subst -, ,$(DEB_VERSION)))
PY_VERSION := $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml)
# The build tools see a clean environment: PATH may start with pyenv shims, which make pybuild
# use the wrong Python ("No module named build").
CLEAN_ENV := env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=$(HOME) LC_ALL=C.UTF-8

deb:
	@if [ -z "$(DEB_VERSION)" ]; then
		echo "make deb: no version in packaging/debian/changelog (is dpkg-dev installed?)" >&2; exit 1
	fi
	if [ "$(DEB_UPSTREAM)" != "$(PY_VERSION)" ]; then
		echo "make deb: packaging/debian/changelog is at $(DEB_VERSION) but pyproject.toml at $(PY_VERSION):" \
		     "add a changelog entry for $(PY_VERSION)" >&2; exit 1
	fi
	started=$$SECONDS
	tmp=$$(mktemp -d)
	trap 'rm -rf "$$tmp"' EXIT
	src=$$tmp/pmlmd-$(DEB_UPSTREAM)
	mkdir "$$src"
	# The working tree without VCS data, caches and build products, and with the packaging as debian/.
	tar -C . --exclude-vcs --exclude=./$(DIST) --exclude=./build --exclude=./debian \
	    --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' --exclude=.hypothesis \
	    --exclude=.pytest_cache --exclude=.benchmarks --exclude=./bench/results -cf - . | tar -C "$$src" -xf -
	cp -r packaging/debian "$$src/debian"
	rm -f "$$src/debian/README.md"
	if ! (cd "$$src" && $(CLEAN_ENV) dpkg-buildpackage -us -uc -b) >"$$tmp/build.log" 2>&1; then
		cat "$$tmp/build.log" >&2
		echo "make deb: dpkg-buildpackage failed (output above)" >&2; exit 1
	fi
	mkdir -p $(DIST)
	rm -f $(DIST)/pmlmd_*.deb $(DIST)/pmlmd_*.build
	mv "$$tmp"/pmlmd_$(DEB_VERSION)_all.deb $(DIST)/
	mv "$$tmp/build.log" $(DIST)/pmlmd_$(DEB_VERSION)_all.build
	echo "built $(DIST)/pmlmd_$(DEB_VERSION)_all.deb in $$((SECONDS - started))s" \
	     "(log: $(DIST)/pmlmd_$(DEB_VERSION)_all.build)"

lintian:
	@debs=($(DIST)/pmlmd_*.deb)
	if [ ! -e "$${debs[0]}" ]; then echo "make lintian: no $(DIST)/pmlmd_*.deb: run make deb first" >&2; exit 1; fi
	$(CLEAN_ENV) lintian --fail-on error,warning "$${debs[@]}"
	echo "lintian: no errors or warnings in $${debs[*]}"

clean:
	@rm -rf $(DIST) build

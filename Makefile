# gitbackup: nothing to build; these targets run, test and install it.
PYTHON  ?= python3
PREFIX  ?= /opt/gitbackup
DEB_PACKAGES = git openssh-client openssh-server tar gzip xz-utils zstd \
               postgresql postgresql-client gitolite3 procps chromium

.PHONY: help test demo deps bench install check-syntax

help:
	@echo "make demo     a real end-to-end backup on this machine (loopback only)"
	@echo "make test     the test suite (real git, sshd, sftp, tar, PostgreSQL)"
	@echo "make deps     install the Debian packages (as root), else print the line"
	@echo "make bench    size-dependent measurements (slow)"
	@echo "make install  copy the scripts to PREFIX=$(PREFIX)"

test: check-syntax
	$(PYTHON) tests/run.py $(TESTS)

check-syntax:
	$(PYTHON) -m py_compile client.py server.py sendmail.py modules/*.py

demo:
	$(PYTHON) tests/demo.py

bench:
	$(PYTHON) bench/bench.py

deps:
	@if [ "$$(id -u)" = 0 ]; then \
	    missing=""; \
	    for p in $(DEB_PACKAGES); do \
	        dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	    done; \
	    if [ -n "$$missing" ]; then \
	        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing </dev/null; \
	    else echo "all Debian packages present"; fi; \
	else \
	    echo "run as root, or:"; \
	    echo "  sudo apt-get install -y $(DEB_PACKAGES)"; \
	fi

install:
	install -d $(DESTDIR)$(PREFIX)/modules
	install -m 0755 client.py server.py sendmail.py $(DESTDIR)$(PREFIX)/
	install -m 0644 modules/*.py $(DESTDIR)$(PREFIX)/modules/
	install -m 0644 conf.example.ini $(DESTDIR)$(PREFIX)/
	@echo "installed in $(DESTDIR)$(PREFIX); now write $(PREFIX)/backup.ini (see conf.example.ini)"

# gitbackup: nothing to build; these targets run, test, install and package it.
PYTHON  ?= python3
PREFIX  ?= /opt/gitbackup
# Every program the tests run comes from one of these (or from an
# essential package: coreutils, util-linux, passwd, dpkg, mount).
DEB_PACKAGES = git openssh-client openssh-server tar gzip xz-utils zstd \
               postgresql postgresql-client gitolite3 procps chromium \
               postfix prometheus prometheus-node-exporter \
               lintian help2man man-db systemd rclone faketime strace \
               sudo rsync acl attr libcap2-bin
# Only for `make bench`, which compares gitbackup with them when installed.
BENCH_PACKAGES = restic borgbackup
# postfix asks how to deliver mail: a fresh install gets "Local only"
# (loopback, local mailboxes), never an Internet site. The tests run their
# own private instance; an already installed postfix is left as it is.
POSTFIX_PRESEED = postfix postfix/main_mailer_type select Local only

.PHONY: help test test-compat demo deps bench bench-deps install deb check-syntax

help:
	@echo "make demo     a real end-to-end backup on this machine (loopback only)"
	@echo "make test     the test suite (real git, sshd, sftp, tar, PostgreSQL)"
	@echo "make test-compat  the oldest Pythons: client on 3.6, node on 3.8 (pyenv)"
	@echo "make deps     install the Debian packages the tests need (as root), else print the line"
	@echo "make bench    gitbackup against restic and borg (slow; BENCH_SCALE=0.05 quick)"
	@echo "make bench-deps  install restic and borg for make bench (as root)"
	@echo "make install  copy the scripts to PREFIX=$(PREFIX)"
	@echo "make deb      build build/gitbackup_<version>_all.deb (dpkg-deb, help2man)"

test: check-syntax
	$(PYTHON) tests/run.py $(TESTS)

# Also part of `make test`: client.py on Python 3.6, server.py on 3.8.
test-compat:
	$(PYTHON) tests/run.py tests.test_compat

check-syntax:
	$(PYTHON) -m py_compile client.py server.py sendmail.py modules/*.py

demo:
	$(PYTHON) tests/demo.py

bench:
	$(PYTHON) bench/bench.py

bench-deps:
	@if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(BENCH_PACKAGES) </dev/null; \
	else echo "run as root, or:"; echo "  sudo apt-get install -y $(BENCH_PACKAGES)"; fi

deps:
	@if [ "$$(id -u)" = 0 ]; then \
	    missing=""; \
	    for p in $(DEB_PACKAGES); do \
	        dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	    done; \
	    case " $$missing " in *" postfix "*) \
	        echo '$(POSTFIX_PRESEED)' | debconf-set-selections;; esac; \
	    if [ -n "$$missing" ]; then \
	        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing </dev/null; } || exit 1; \
	    else echo "all Debian packages present"; fi; \
	    if getent shadow root | cut -d: -f2 | grep -q '^!'; then \
	        echo "root's password is locked ('!'): setting '*' (still no password), so that the tests' sshd (UsePAM no) lets root in by key"; \
	        usermod -p '*' root; \
	    fi; \
	else \
	    echo "run as root, or:"; \
	    echo "  sudo apt-get install -y $(DEB_PACKAGES)"; \
	fi

deb: check-syntax
	PYTHON=$(PYTHON) sh packaging/build-deb.sh $(CURDIR)/build

install:
	install -d $(DESTDIR)$(PREFIX)/modules
	install -m 0755 client.py server.py sendmail.py $(DESTDIR)$(PREFIX)/
	install -m 0644 modules/*.py $(DESTDIR)$(PREFIX)/modules/
	install -m 0644 conf.example.ini $(DESTDIR)$(PREFIX)/
	@echo "installed in $(DESTDIR)$(PREFIX); now write $(PREFIX)/backup.ini (see conf.example.ini)"

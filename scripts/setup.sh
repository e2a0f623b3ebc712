#!/usr/bin/env bash
# Install everything mailhop needs into .venv (and, with --test, the Debian peers the tests drive).
# Idempotent: a second run installs nothing new. Usage: scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

apt_install() {
    # Debian starts a package's service on install; our peers run privately under the tests instead.
    local missing=()
    for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: need root to install Debian packages: ${missing[*]}" >&2
        return 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local had_policy=0
    [[ -e /usr/sbin/policy-rc.d ]] && had_policy=1
    [[ $had_policy -eq 1 ]] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null || true
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    [[ $had_policy -eq 1 ]] || rm -f /usr/sbin/policy-rc.d
}

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    apt_install python3 python3-venv python3-dev
    PY=python3
fi
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv 2>/dev/null || { apt_install python3-venv; "$PY" -m venv .venv; }
fi

if [[ $want_test -eq 1 ]]; then
    # postfix: smtp-source/smtp-sink and the reference MTA; swaks: the admin's test client.
    # testssl.sh: the protocol/cipher scan in tests/security/test_testssl.py.
    # rspamd, opendkim(-tools): the real content filter (HTTP and milter) and DKIM milter/verifier peers.
    apt_install postfix swaks libnet-ssleay-perl libio-socket-ssl-perl ca-certificates openssl testssl.sh \
        rspamd opendkim opendkim-tools iproute2 util-linux strace gcc libc6-dev
    extras="[test]"
else
    extras="[fast]"
fi

stamp=".venv/.installed${extras}"
if [[ ! -e "$stamp" || pyproject.toml -nt "$stamp" ]]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e ".${extras}"
    touch "$stamp"
fi

if [[ $want_test -eq 1 && ! -e .venv/vectors/.done ]]; then
    # The upstream test vectors the check tests replay through mailhop: pyspf's RFC 7208 suite and dkimpy's
    # signed messages and keys ship only in their source distributions, so fetch those from the registry.
    mkdir -p .venv/vectors
    .venv/bin/python -m pip download -q --no-binary :all: --no-deps -d .venv/vectors pyspf==2.0.14 dkimpy==1.1.8
    for f in .venv/vectors/*.tar.gz; do tar xzf "$f" -C .venv/vectors; done
    touch .venv/vectors/.done
fi

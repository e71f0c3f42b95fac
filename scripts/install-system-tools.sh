#!/usr/bin/env bash
# Installs the Debian tools the test-suite talks to, when they are missing and we are root.
# Without root it only says what is missing: those tests then skip on a developer's machine
# (never in CI, where CI=true turns a missing tool into a failure).
set -euo pipefail

missing=()
command -v /usr/bin/storescu >/dev/null 2>&1 || missing+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-tools: missing Debian packages: ${missing[*]} (not root: not installing;" \
         "the tests that need them will be skipped)" >&2
    exit 0
fi
echo "install-system-tools: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"

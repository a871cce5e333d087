#!/usr/bin/env bash
# Installs (apt) and starts every real service the test suite uses: a single-node SLURM
# cluster, an sshd on 127.0.0.1 (plugin guide example), a local podman image and Chromium for
# the browser tests. Idempotent.
# Hypha and Triton need no system service: the tests start them from the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "start-services: not root; skipping system services (tests that need them will skip" \
       "locally and fail in CI)" >&2
  exit 0
fi
for script in start-slurm.sh start-sshd.sh build-podman-image.sh start-s3.sh install-chromium.sh; do
  echo "== .ci/$script"
  bash ".ci/$script"
done

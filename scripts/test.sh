#!/usr/bin/env bash
# The whole test suite: installs the test provider (oidc-provider, pinned in
# tests/provider/package-lock.json), builds the binaries the end-to-end tests
# run, then runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

npm ci --prefix tests/provider --no-audit --no-fund --loglevel=error
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"

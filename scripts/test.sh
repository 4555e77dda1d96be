#!/usr/bin/env bash
# The whole test suite: installs the test provider (oidc-provider, pinned in
# tests/provider/package-lock.json) and the Node client's compiler (pinned in
# clients/node/package-lock.json), type-checks and compiles the Node client
# with its Nuxt example, builds the binaries the end-to-end tests run, then
# runs the Node client's tests and every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

npm ci --prefix tests/provider --no-audit --no-fund --loglevel=error
npm ci --prefix clients/node --no-audit --no-fund --loglevel=error
npm run --prefix clients/node --silent build
cargo build --workspace --bins --locked
npm test --prefix clients/node --silent
cargo test --workspace --locked "$@"

#!/usr/bin/env bash
# Benchmarks of token-agent beside the physical floor (a bare Unix-socket
# echo) and beside Debian's oidc-agent, as BENCHMARKS.md describes.
#
#   scripts/bench.sh            # the full set, about 10 minutes once built
#   scripts/bench.sh --quick    # the same figures, smaller, about 3 minutes
#   scripts/bench.sh --process  # figure 3 alone (hyperfine), about 1 minute
#
# Installs what it needs when missing (hyperfine and oidc-agent-cli from
# Debian's packages, Node.js for the test provider), builds release binaries,
# prints the machine, then every figure as markdown tables. Everything it
# starts listens on 127.0.0.1 or on Unix sockets in a temporary folder, and
# is stopped at the end. Nothing here asserts on time: figures are printed,
# goals are reported as met or MISSED.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
PROCESS_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        --process) PROCESS_ONLY=1 ;;
        -h | --help)
            sed -n '2,13p' "$0"
            exit 0
            ;;
        *)
            echo "bench.sh: unknown argument $arg (try --quick)" >&2
            exit 2
            ;;
    esac
done

# --- What it needs -----------------------------------------------------------
missing=()
command -v hyperfine >/dev/null || missing+=(hyperfine)
command -v oidc-agent >/dev/null || missing+=(oidc-agent-cli)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v lscpu >/dev/null || missing+=(util-linux)
if ((${#missing[@]})); then
    echo "installing ${missing[*]} from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -d tests/provider/node_modules/oidc-provider ]; then
    npm ci --prefix tests/provider --no-audit --no-fund --loglevel=error
fi

cargo build --release --locked -p token-agent -p token-agent-client -p token-agent-bench
BIN="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release"
BENCH="$BIN/token-agent-bench"

WORK="$(mktemp -d /tmp/token-agent-bench.XXXXXX)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

run() {
    echo
    echo "\$ $*"
    "$@"
}

# --- The machine -------------------------------------------------------------
echo "# token-agent benchmarks ($([ "$QUICK" = 1 ] && echo quick || echo full) run, $(date -u '+%Y-%m-%d %H:%M UTC'))"
echo
if git rev-parse --git-dir >/dev/null 2>&1; then
    echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' (with uncommitted changes)')"
else
    echo "not a git checkout"
fi
echo '```'
echo "\$ nproc"
nproc
echo "\$ free -h"
free -h
echo "\$ lscpu | head -n 20"
lscpu | head -n 20
echo "\$ uname -r"
uname -r
echo "\$ uptime"
uptime
echo '```'
echo "hyperfine $(hyperfine --version | awk '{print $2}'), $(oidc-agent --version 2>&1 | head -n 1), node $(node --version), $(rustc --version)"

# --- Figures 1 and 2: serving latency and throughput ------------------------
if [ "$PROCESS_ONLY" = 0 ]; then
if [ "$QUICK" = 1 ]; then
    run "$BENCH" serve --work-dir "$WORK" --sessions 10000 --requests 20000 --seconds 2
else
    run "$BENCH" serve --work-dir "$WORK" --sessions 100000 --requests 100000 --seconds 5
fi

# --- Figures 4 and 6: scale and growth ---------------------------------------
if [ "$QUICK" = 1 ]; then
    run "$BENCH" scale --work-dir "$WORK" --sessions 1000,10000,100000 --idle 10 --starts 1 --requests 20000
else
    run "$BENCH" scale --work-dir "$WORK" --sessions 1000,10000,100000 --idle 60 --starts 3 --requests 50000
fi

# --- Figure 5: scheduling ----------------------------------------------------
if [ "$QUICK" = 1 ]; then
    # 2,000 due over 15 s: the full run's rate (10,000 a minute) and more.
    run "$BENCH" schedule --work-dir "$WORK" --sessions 2000 --window 15 --grace 15
    run "$BENCH" schedule --work-dir "$WORK" --sessions 2000 --window 0 --grace 15 --provider-delay-ms 20
else
    run "$BENCH" schedule --work-dir "$WORK" --sessions 1000,10000,100000 --window 60 --grace 30
    run "$BENCH" schedule --work-dir "$WORK" --sessions 10000 --window 0 --grace 30
    run "$BENCH" schedule --work-dir "$WORK" --sessions 2000 --window 0 --grace 30 --provider-delay-ms 20
fi

fi # PROCESS_ONLY

# --- Figure 3: one whole process, beside oidc-token and /bin/true ------------
# One provider (oidc-provider on Node, 1-hour access tokens), two sign-ins:
# oidc-gen spends its refresh token at once, so each agent gets its own.
echo
echo "figure 3: starting the test provider, token-agent and oidc-agent"
(cd tests/provider && ACCESS_TOKEN_TTL=3600 exec node server.mjs >"$WORK/provider.json" 2>"$WORK/provider.log") &
PIDS+=($!)
for _ in $(seq 1 100); do
    [ -s "$WORK/provider.json" ] && break
    sleep 0.1
done
ISSUER="$(sed -n 's/.*"issuer":"\([^"]*\)".*/\1/p' "$WORK/provider.json")"
sign_in() {
    (cd tests/provider && node sign-in.mjs --issuer "$ISSUER" --client-id agent-basic --client-secret basic-secret) |
        sed -n 's/.*"refresh_token":"\([^"]*\)".*/\1/p'
}
umask 077
sign_in | tr -d '\n' >"$WORK/rt-token-agent"
sign_in | tr -d '\n' >"$WORK/rt-oidc-agent"
printf basic-secret >"$WORK/client-secret"

export TOKEN_AGENT_SOCK="$WORK/token-agent.sock"
XDG_CONFIG_HOME="$WORK/no-config" "$BIN/token-agent" --store-dir "$WORK/token-agent-store" 2>"$WORK/token-agent.log" &
PIDS+=($!)
for _ in $(seq 1 100); do
    "$BIN/tokenctl" ping >/dev/null 2>&1 && break
    sleep 0.05
done
"$BIN/tokenctl" import bench --issuer "$ISSUER" --client-id agent-basic \
    --client-secret-file "$WORK/client-secret" --scope openid --scope offline_access \
    --refresh-token-file "$WORK/rt-token-agent"

export OIDC_CONFIG_DIR="$WORK/oidc-agent-config"
mkdir -p "$OIDC_CONFIG_DIR"
oidc-agent --no-autoreauthenticate --socket-path="$WORK/oidc-agent.sock" --json >"$WORK/oidc-agent.json"
PIDS+=("$(sed -n 's/.*"dpid":[[:space:]]*"\([0-9]*\)".*/\1/p' "$WORK/oidc-agent.json")")
export OIDC_SOCK="$WORK/oidc-agent.sock"
oidc-gen bench --iss "$ISSUER" --client-id agent-basic --client-secret basic-secret \
    --rt "$(cat "$WORK/rt-oidc-agent")" --scope "openid offline_access" \
    --no-save --prompt=none --confirm-default --no-url-call >"$WORK/oidc-gen.log" 2>&1

# Both serve the cached token; check before timing.
PATH="$BIN:$PATH"
if [ -z "$(tokenctl get bench)" ] || [ "$(oidc-token bench)" != "$(oidc-token bench)" ]; then
    echo "bench.sh: tokenctl or oidc-token does not serve a cached token; see $WORK" >&2
    trap - EXIT
    exit 1
fi
if [ "$QUICK" = 1 ]; then RUNS=300; else RUNS=1500; fi
run hyperfine -N --warmup 50 --runs "$RUNS" --export-json "$WORK/hyperfine.json" \
    '/bin/true' 'tokenctl get bench' 'oidc-token bench' 'tokenctl --version'
run "$BENCH" hyperfine "$WORK/hyperfine.json"

echo
echo "done: $(uptime)"

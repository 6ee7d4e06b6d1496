#!/usr/bin/env bash
# Proves the Dockerfile's runtime stage without a Docker engine: the same recipe in a clean temp
# folder (package.json and the bundle dist/server.js, no node_modules, no source map), started the way the image
# starts it (`node dist/server.js`, NODE_ENV=production, a minimal environment), probed with the
# image's own HEALTHCHECK command and /readyz, then stopped with SIGTERM, which must end it cleanly.
# Needs `npm run build` first. CONTAINER_NODE: the node binary to run (the image's version in CI).
set -euo pipefail
cd "$(dirname "$0")/.."

node_bin="${CONTAINER_NODE:-node}"
work="$(mktemp -d)"
server_pid=""
cleanup () {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill -KILL "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
fail () { echo "container check FAILED: $*"; [ -f "$work/server.log" ] && tail -n 30 "$work/server.log"; exit 1; }

# The recipe checked here must still be the Dockerfile's: fail loudly when they drift apart.
grep -q '^FROM node:24\.21\.0-bookworm-slim AS runtime' Dockerfile || fail "Dockerfile runtime stage is no longer node:24.21.0 (update .ci/run and this script)"
runtime_stage="$(sed -n '/AS runtime$/,$p' Dockerfile)"
grep -q '^COPY package.json ./$' <<<"$runtime_stage" || fail "Dockerfile runtime stage no longer copies package.json alone"
grep -q '^COPY --from=build /app/dist/server.js ./dist/server.js$' <<<"$runtime_stage" || fail "Dockerfile runtime stage no longer copies the bundle (dist/server.js) alone from the build stage"
grep -q 'npm \(ci\|i\|install\)\|yarn\|pnpm' <<<"$(grep -v '^#' <<<"$runtime_stage")" && fail "Dockerfile runtime stage installs packages again (the bundle needs none)"
grep -q '^RUN rm -rf /usr/local/lib/node_modules ' <<<"$runtime_stage" || fail "Dockerfile runtime stage no longer removes the base image's npm"
# runAsNonRoot (Kubernetes) refuses a named USER without runAsUser: the last USER must be a
# numeric uid:gid other than root's (1000:1000, the base image's node user).
runtime_user="$(grep '^USER ' <<<"$runtime_stage" | tail -n 1)"
grep -qE '^USER [1-9][0-9]*:[1-9][0-9]*$' <<<"$runtime_user" || fail "Dockerfile runtime stage's USER is not a numeric non-root uid:gid (${runtime_user:-none})"
# The image runs what `npm start` runs (package.json), Node options included; so does this check.
start_argv="$(node -p "JSON.stringify(require('./package.json').scripts.start.split(' ')).replaceAll(',', ', ')")"
grep -qxF "CMD $start_argv" Dockerfile || fail "Dockerfile's CMD is not npm start's command ($start_argv)"
node_options="$(node -p "require('./package.json').scripts.start.split(' ').filter((w) => w.startsWith('--')).join(' ')")"
grep -q "dist/server.js\"\]$" <<<"$start_argv" || fail "npm start no longer runs dist/server.js"
[ -f dist/server.js ] || fail "no dist/server.js: run npm run build first"

echo "node: $("$node_bin" --version) ($node_bin)"
cp package.json "$work/"
mkdir "$work/dist"
cp dist/server.js "$work/dist/server.js"
# No node_modules anywhere above the folder either, so that an import the bundle missed fails below.
[ ! -e "$work/node_modules" ] || fail "node_modules in the runtime folder"

port="$("$node_bin" -e "const s=require('net').createServer().listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})")"
metrics_port="$("$node_bin" -e "const s=require('net').createServer().listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})")"
closed="$("$node_bin" -e "const s=require('net').createServer().listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})")"

# A minimal production environment: no Redis (in-memory state); the upstream and the IdP are
# closed loopback ports, which readiness must not depend on; metrics on a port of their own.
(cd "$work" && exec env -i PATH="$PATH" HOME="$work" NODE_ENV=production \
  HOST=127.0.0.1 PORT="$port" METRICS_PORT="$metrics_port" LOG_LEVEL=info \
  CV_API_KEY=ci-container-check-key CV_BASE_URL="http://127.0.0.1:$closed" \
  OIDC_ISSUER="http://127.0.0.1:$closed" OIDC_CLIENT_ID=patient-web \
  "$node_bin" $node_options dist/server.js) > "$work/server.log" 2>&1 &
server_pid=$!

probe () {
  "$node_bin" -e "fetch('http://127.0.0.1:$port$1').then(async (r) => { process.stdout.write(r.status + ' ' + await r.text()); process.exit(r.status === $2 ? 0 : 1) }, () => process.exit(2))"
}

ready=""
for _ in $(seq 1 100); do
  kill -0 "$server_pid" 2>/dev/null || fail "the server exited during start-up"
  if answer="$(probe /readyz 200 2>/dev/null)"; then ready="$answer"; break; fi
  sleep 0.2
done
[ -n "$ready" ] || fail "/readyz did not answer 200 within 20 s"
echo "/readyz: $ready"
case "$ready" in *'"sharedState":"memory"'*) ;; *) fail "/readyz does not report in-memory state" ;; esac
probe /openapi.json 200 >/dev/null || fail "/openapi.json did not answer 200"

# Prometheus on METRICS_PORT (on by default in the image, EXPOSE 9464), never on the public port:
# the bundle's metrics, prom-client's default process metrics included, answer there.
probe /metrics 404 >/dev/null || fail "the public port does not answer /metrics with 404"
scrape="$("$node_bin" -e "fetch('http://127.0.0.1:$metrics_port/metrics').then(async (r) => { process.stdout.write(await r.text()); process.exit(r.status === 200 ? 0 : 1) }, () => process.exit(2))")" \
  || fail "METRICS_PORT did not answer GET /metrics with 200"
for metric in process_cpu_seconds_total nodejs_gc_duration_seconds_count http_request_duration_seconds_count bff_shared_state_mode care360_upstream_duration_seconds_count bff_limiter_decisions_total; do
  grep -q "^$metric" <<<"$scrape" || fail "no $metric in the scrape of METRICS_PORT"
done
grep -q '^bff_shared_state_mode{mode="memory"} 1$' <<<"$scrape" || fail "the scrape does not report in-memory state"
echo "/metrics: on METRICS_PORT only ($(grep -c '^[a-z]' <<<"$scrape") samples)"

# The image's HEALTHCHECK command, as written in the Dockerfile, with the image's node.
healthcheck="$(node -e "
  const text = require('fs').readFileSync('Dockerfile', 'utf8').replace(/\\\\\\n/g, ' ')
  const match = /HEALTHCHECK .*? CMD (\[.*\])/.exec(text)
  if (!match) process.exit(1)
  console.log(JSON.stringify(JSON.parse(match[1])))
")" || fail "no HEALTHCHECK CMD in the Dockerfile"
HOST=127.0.0.1 PORT="$port" "$node_bin" -e "
  const [command, ...args] = JSON.parse(process.argv[1])
  const result = require('child_process').spawnSync(command === 'node' ? process.execPath : command, args, { stdio: 'inherit', env: process.env, timeout: 3000 })
  process.exit(result.status ?? 1)
" "$healthcheck" || fail "the Dockerfile's HEALTHCHECK command failed"
echo "HEALTHCHECK: ok"

kill -TERM "$server_pid"
status=""
for _ in $(seq 1 75); do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    set +e; wait "$server_pid"; status=$?; set -e
    break
  fi
  sleep 0.2
done
[ -n "$status" ] || fail "the server did not exit within 15 s of SIGTERM"
server_pid=""
[ "$status" = 0 ] || fail "the server exited with status $status after SIGTERM"
grep -q '"level":50\|"level":60' "$work/server.log" && fail "error lines in the server log"
echo "SIGTERM: clean exit (0)"
echo "container check passed"

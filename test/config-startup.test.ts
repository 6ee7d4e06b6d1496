import t from 'tap'
import { spawn, spawnSync, type ChildProcess, type SpawnOptions } from 'node:child_process'
import { once } from 'node:events'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Readable } from 'node:stream'
import { setTimeout as sleep } from 'node:timers/promises'
import { buildApp } from '../src/app.js'
import { loadConfig } from '../src/config.js'
import { freePort } from './helpers/ports.js'
import { startRedis } from './helpers/redis.js'

/**
 * Start-up as an operator sees it: the real entry point in a child process, with environments an
 * operator could write. The entry point is the production bundle, built from the checked-in
 * source into a directory of this suite's own (scripts/build.mjs, BUILD_OUTDIR), so that it never
 * lags behind src/ and each start costs a fraction of what tsx's compile on the fly does.
 */
// Each child loads the 4.6 MB bundle (about a second of CPU on an idle core, several on a loaded
// 2-core machine): the file's 17 starts took close to the suite's 60 s under load. Still bounded.
t.setTimeout(180_000)

const KEY = 'org-secret-key-123'
const CLIENT_SECRET = 'web-client-secret-456'
const REDIS_PASSWORD = 'redis-pw-secret-789'
const SECRETS = [KEY, CLIENT_SECRET, REDIS_PASSWORD]

const outdir = mkdtempSync(join(tmpdir(), 'bff-startup-'))
// A hang guard only: at 30 s a build on a loaded machine was killed ("build failed: " with no output).
const built = spawnSync(process.execPath, ['scripts/build.mjs'], { env: { ...process.env, BUILD_OUTDIR: outdir }, encoding: 'utf8', timeout: 120_000 })
if (built.status !== 0) throw new Error(`build failed (${built.signal ?? built.status}): ${built.stderr}`)
const bundle = join(outdir, 'server.js')
t.teardown(() => { rmSync(outdir, { recursive: true, force: true }) })

/**
 * Preloaded into a refused start: at exit, how long (ms) after its first write to stderr (the
 * refusal's message) it exits, written to fd 3; -1 if it never wrote. A refusal writes and exits in
 * one synchronous step, so this is a few CPU instructions whatever the machine's load, where a
 * refusal that waits for something (a timer, a socket) before it exits shows its wait. Its wall
 * time would not: loading the bundle alone takes from one to many seconds, with the CPU shared.
 */
const exitLag = join(outdir, 'exit-lag.mjs')
writeFileSync(exitLag, [
  "import { writeSync } from 'node:fs'",
  "import { performance } from 'node:perf_hooks'",
  'let said',
  'const write = process.stderr.write',
  'process.stderr.write = function (...args) { said ??= performance.now(); return write.apply(this, args) }',
  "process.once('exit', () => { writeSync(3, String(said === undefined ? -1 : performance.now() - said)) })",
  ''
].join('\n'))
/** How long a refused start may take from its message to its exit (ms): a preemption or two. */
const LAG_MS = 500
/** Past this, a start that should be refused is taken for a hang and killed (its status is then null, not 1). */
const HANG_MS = 30_000
/** A started server's SIGTERM is followed by a SIGKILL after this long: its exit status then says it did not stop. */
const STOP_MS = 15_000

/** A valid configuration (in-memory, no metrics), with `env` over it; null deletes a variable. */
function serverEnv (env: Record<string, string | null>): Record<string, string> {
  const all: Record<string, string | null> = {
    PATH: process.env.PATH ?? '',
    // tap follows spawned processes (bundleNode drops its loader); should it still, the bundle's
    // coverage is not the suite's (test/config.test.ts).
    _TAPJS_PROCESSINFO_COVERAGE_: '0',
    CV_API_KEY: KEY,
    OIDC_ISSUER: 'https://idp.example.com',
    OIDC_CLIENT_ID: 'patient-web',
    HOST: '127.0.0.1',
    PORT: '1',
    METRICS_PORT: '0',
    ...env
  }
  return Object.fromEntries(Object.entries(all).filter((entry): entry is [string, string] => entry[1] !== null))
}

/**
 * The bundle in a Node process of its own, as an operator starts it. tap adds its process-info
 * loader to every child's NODE_OPTIONS (whatever env it is given): it hooks each module load on a
 * thread of its own and reads the 8 MB source map at exit, which made a refused start take 14 s
 * instead of 2 s on a loaded 2-core machine. `env -u` drops it before Node starts.
 */
function bundleNode (args: string[], options: SpawnOptions): ChildProcess {
  return spawn('env', ['-u', 'NODE_OPTIONS', process.execPath, ...args, bundle], options)
}

/** A start that must be refused: its exit status, output and how long it took from its message to its exit (bounded: a start that is not refused is killed). */
async function refused (env: Record<string, string | null>): Promise<{ status: number | null, stdout: string, stderr: string, lagMs: number }> {
  const child = bundleNode(['--import', exitLag], { env: serverEnv(env), stdio: ['ignore', 'pipe', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  let lag = ''
  const [, out, err, fd3] = child.stdio as unknown as [null, Readable, Readable, Readable]
  out.setEncoding('utf8').on('data', (chunk: string) => { stdout += chunk })
  err.setEncoding('utf8').on('data', (chunk: string) => { stderr += chunk })
  fd3.setEncoding('utf8').on('data', (chunk: string) => { lag += chunk })
  const killer = setTimeout(() => { child.kill('SIGKILL') }, HANG_MS)
  const orphan = (): void => { child.kill('SIGKILL') }
  process.once('exit', orphan)
  const [status] = await once(child, 'close') as [number | null]
  clearTimeout(killer)
  process.removeListener('exit', orphan)
  return { status, stdout, stderr, lagMs: lag === '' ? Number.NaN : Number(lag) }
}

interface Running { stdout: () => string, stderr: () => string, stop: () => Promise<number | string | null> }

/** A start that must succeed: the child, its output so far, and a bounded stop (SIGTERM, then SIGKILL). */
function started (t: { teardown: (fn: () => unknown) => void }, env: Record<string, string | null>, preload: string[] = []): Running {
  const child = bundleNode(preload.flatMap((file) => ['--import', file]), { env: serverEnv(env), stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  let err = ''
  const [, stdout, stderr] = child.stdio as unknown as [null, Readable, Readable]
  stdout.setEncoding('utf8').on('data', (chunk: string) => { out += chunk })
  stderr.setEncoding('utf8').on('data', (chunk: string) => { err += chunk })
  const exited = once(child, 'exit')
  // Should tap end this file at its timeout, no server outlives it.
  const orphan = (): void => { child.kill('SIGKILL') }
  process.once('exit', orphan)
  exited.then(() => { process.removeListener('exit', orphan) }, () => {})
  const stop = async (): Promise<number | string | null> => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM')
    const killer = setTimeout(() => { child.kill('SIGKILL') }, STOP_MS)
    await exited
    clearTimeout(killer)
    return child.exitCode ?? child.signalCode
  }
  t.teardown(stop)
  return { stdout: () => out, stderr: () => err, stop }
}

/** Waits (bounded: a start takes seconds on a loaded machine) until `test` holds for the output so far. */
async function until (test: () => boolean, ms = 30_000): Promise<boolean> {
  const end = Date.now() + ms
  while (Date.now() < end) {
    if (test()) return true
    await sleep(25)
  }
  return test()
}

function lines (text: string): Array<Record<string, unknown>> {
  return text.split('\n').filter((line) => line !== '').map((line) => JSON.parse(line) as Record<string, unknown>)
}

t.test('a refused start exits 1 at once with one message naming the variable, and never a secret', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'bff-startup-key-'))
  const empty = join(dir, 'empty')
  writeFileSync(empty, '')
  // More refusals are checked on loadConfig itself (test/config.test.ts); these, from the process.
  const cases: Array<[string, Record<string, string | null>, string]> = [
    ['no key', { CV_API_KEY: null }, 'CV_API_KEY'],
    ['key and key file', { CV_API_KEY_FILE: empty }, 'CV_API_KEY'],
    ['key file a directory', { CV_API_KEY: null, CV_API_KEY_FILE: dir }, 'CV_API_KEY_FILE'],
    ['quoted rate, as docker env files leave it', { CV_RATE_LIMIT: '"450/60s"' }, 'CV_RATE_LIMIT'],
    ['REDIS_URL with a password, malformed', { OIDC_CLIENT_SECRET: CLIENT_SECRET, PUBLIC_URL: 'https://patients.example.com', REDIS_URL: `redis://:${REDIS_PASSWORD}@127.0.0.1:99999` }, 'REDIS_URL'],
    ['METRICS_PORT equal to PORT', { PORT: '3000', METRICS_PORT: '3000' }, 'METRICS_PORT']
  ]
  // Two at a time: two cores.
  const runs: Array<Awaited<ReturnType<typeof refused>>> = []
  for (let i = 0; i < cases.length; i += 2) runs.push(...await Promise.all(cases.slice(i, i + 2).map(async ([, env]) => await refused(env))))
  for (const [i, [what, , variable]] of cases.entries()) {
    const run = runs[i] as Awaited<ReturnType<typeof refused>>
    t.equal(run.status, 1, `${what}: exit 1`)
    t.ok(run.lagMs >= 0 && run.lagMs < LAG_MS, `${what}: exits right after its message (${Math.round(run.lagMs)} ms)`)
    t.equal(run.stdout, '', `${what}: nothing on stdout`)
    const said = run.stderr.trimEnd().split('\n')
    t.same(said, ['Invalid configuration:', said[1]], `${what}: one message, no stack trace`)
    t.match(said[1], new RegExp(`^ {2}${variable}: `), `${what}: names ${variable}`)
    for (const secret of SECRETS) t.notMatch(run.stderr, secret, `${what}: no secret`)
  }
})

t.test('a key file that is no file (a FIFO, a device) or far too large stops start-up at once, naming it', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'bff-startup-key-'))
  const fifo = join(dir, 'fifo')
  t.equal(spawnSync('mkfifo', [fifo]).status, 0, 'a FIFO')
  const huge = join(dir, 'huge')
  writeFileSync(huge, 'k'.repeat(1024 * 1024))
  const cases: Array<[string, string]> = [['a FIFO nobody writes', fifo], ['a device that never ends', '/dev/zero'], ['1 MiB', huge]]
  const runs = await Promise.all(cases.map(async ([, file]) => await refused({ CV_API_KEY: null, CV_API_KEY_FILE: file })))
  for (const [i, [what]] of cases.entries()) {
    const run = runs[i] as Awaited<ReturnType<typeof refused>>
    t.equal(run.status, 1, `${what}: exit 1 (not a hang, not a start)`)
    t.match(run.stderr, /^ {2}CV_API_KEY_FILE: /m, `${what}: names the variable`)
  }
})

t.test('a key in quotes, as a docker env file leaves them, stops start-up without quoting it', async (t) => {
  // `docker run --env-file` and compose's `environment:` list keep quotes: CV_API_KEY="..." is
  // the key with its quotes, which the upstream refuses on every call (502 UPSTREAM_AUTH_FAILED).
  for (const quoted of [`"${KEY}"`, `'${KEY}'`]) {
    const run = await refused({ CV_API_KEY: quoted })
    t.equal(run.status, 1, `${quoted[0]}: refused`)
    t.match(run.stderr, /^ {2}CV_API_KEY: .*quote/m, 'names the variable and says why')
    t.notMatch(run.stderr, KEY)
  }
  const dir = mkdtempSync(join(tmpdir(), 'bff-startup-key-'))
  const file = join(dir, 'key')
  writeFileSync(file, `"${KEY}"\n`)
  const run = await refused({ CV_API_KEY: null, CV_API_KEY_FILE: file })
  t.equal(run.status, 1, 'a quoted key in the file: refused')
  t.match(run.stderr, /^ {2}CV_API_KEY_FILE: .*quote/m)
  t.notMatch(run.stderr, KEY)
})

t.test('a start says where it listens and in which state mode, without secrets', async (t) => {
  const port = await freePort()
  const metricsPort = await freePort()
  const memory = started(t, { PORT: String(port), METRICS_PORT: String(metricsPort), OIDC_CLIENT_SECRET: CLIENT_SECRET, PUBLIC_URL: 'https://patients.example.com' })
  t.ok(await until(() => memory.stdout().includes('"sharedState"')), 'a start-up line with the state mode')
  const line = lines(memory.stdout()).find((entry) => entry.sharedState !== undefined)
  t.match(line, { level: 30, sharedState: 'memory', address: `http://127.0.0.1:${port}`, metrics: `http://127.0.0.1:${metricsPort}` })
  t.equal(await memory.stop(), 0)

  const redis = await startRedis(t)
  const shared = started(t, { PORT: String(port), REDIS_URL: `${redis.url}/0` })
  t.ok(await until(() => shared.stdout().includes('"sharedState"')), 'a start-up line with the state mode')
  t.match(lines(shared.stdout()).find((entry) => entry.sharedState !== undefined), { sharedState: 'redis', address: `http://127.0.0.1:${port}`, metrics: null })
  t.equal(await shared.stop(), 0)
  for (const secret of SECRETS) t.notMatch(memory.stdout() + shared.stdout(), secret, 'no secret in the start-up lines')
})

const hasIPv6Loopback = await new Promise<boolean>((resolve) => {
  const probe = createServer()
  probe.once('error', () => { resolve(false) })
  probe.listen(0, '::1', () => { probe.close(); resolve(true) })
})

t.test('the start-up line writes an IPv6 address in brackets', { skip: !hasIPv6Loopback && 'no IPv6 loopback here' }, async (t) => {
  const port = await freePort()
  const server = started(t, { HOST: '::1', PORT: String(port), METRICS_PORT: '0' })
  t.ok(await until(() => server.stdout().includes('"sharedState"')), 'a start-up line')
  t.match(lines(server.stdout()).find((entry) => entry.sharedState !== undefined), { address: `http://[::1]:${port}` })
  t.equal(await server.stop(), 0)
})

t.test('an identity provider that cannot be discovered at start is said at start', async (t) => {
  // A loopback port nothing listens on: what a mistyped OIDC_ISSUER host or port gives.
  const issuerPort = await freePort()
  const server = started(t, { PORT: String(await freePort()), OIDC_ISSUER: `http://127.0.0.1:${issuerPort}` })
  t.ok(await until(() => server.stdout().includes('Server listening')), 'it starts (the provider is retried by the next sign-in)')
  t.ok(await until(() => /OIDC discovery/.test(server.stdout())), 'a warning names the discovery failure')
  const warning = lines(server.stdout()).find((entry) => typeof entry.msg === 'string' && entry.msg.includes('OIDC_ISSUER'))
  t.match(warning, { level: 40, err: { cause: { message: 'OIDC discovery failed' } } })
  t.match(JSON.stringify(warning), '"code":"ECONNREFUSED"', 'with the cause a network error has')
  t.equal(await server.stop(), 0)
})

t.test('the discovery warning at start, in process: once, with the cause, not the sign-ins\' 503 line', async (t) => {
  const issuerPort = await freePort()
  const written: string[] = []
  const app = await buildApp(loadConfig({ CV_API_KEY: KEY, OIDC_ISSUER: `http://127.0.0.1:${issuerPort}`, OIDC_CLIENT_ID: 'patient-web' }), { logStream: { write: (line: string) => { written.push(line) } } })
  t.teardown(async () => { await app.close() })
  await app.ready()
  t.ok(await until(() => written.some((line) => line.includes('OIDC_ISSUER'))), 'the warning')
  const warnings = written.filter((line) => line.includes('OIDC_ISSUER')).map((line) => JSON.parse(line) as Record<string, unknown>)
  t.match(warnings, [{ level: 40, err: { cause: { name: 'ProviderUnavailable', message: 'OIDC discovery failed' } } }])
})

t.test('a variable the service does not read but nearly spells is a warning at start', async (t) => {
  const server = started(t, { PORT: String(await freePort()), RATE_LIMIT_SESION: '10/1m', LOG_LEVL: 'debug' })
  t.ok(await until(() => server.stdout().includes('RATE_LIMIT_SESION') && server.stdout().includes('LOG_LEVL')), 'a warning per near miss')
  const warnings = lines(server.stdout()).filter((entry) => entry.variable !== undefined)
  t.match(warnings, [{ level: 40, variable: 'RATE_LIMIT_SESION', meant: 'RATE_LIMIT_SESSION' }, { level: 40, variable: 'LOG_LEVL', meant: 'LOG_LEVEL' }])
  t.notMatch(server.stdout(), '10/1m', 'never the value')
  t.equal(await server.stop(), 0)
})

t.test('SIGTERM right after start, before it listens, ends it promptly and leaves no listener', async (t) => {
  const port = await freePort()
  // While the bundle still loads: Node's own disposition, or the entry's first module's handler
  // (src/early-signals.ts; as PID 1, test/pid1-signals.test.ts), ends it (nothing to drain yet).
  const loading = started(t, { PORT: String(port) })
  await sleep(50)
  const began = Date.now()
  t.ok([0, 'SIGTERM'].includes(await loading.stop() as number | string), 'ended by the signal')
  t.ok(Date.now() - began < 5_000, 'promptly')
  t.equal(loading.stderr(), '', 'nothing on stderr')

  // Once the shutdown handler is in place but before the listener is up: HOST's lookup held back,
  // longer than stop() waits before its SIGKILL, so that a stop that waited for the listener is
  // killed (its status 'SIGKILL', not 0) however slow or fast the machine is.
  const dir = mkdtempSync(join(tmpdir(), 'bff-startup-preload-'))
  const preload = join(dir, 'slow-localhost.mjs')
  writeFileSync(preload, [
    "import dns from 'node:dns'",
    'const lookup = dns.promises.lookup',
    `Object.assign(dns.promises, { lookup: async (host, options) => { if (host === 'localhost') { process.stderr.write('lookup\\n'); await new Promise((resolve) => setTimeout(resolve, ${4 * STOP_MS})) } return await lookup.call(dns.promises, host, options) } })`,
    ''
  ].join('\n'))
  const listening = started(t, { HOST: 'localhost', PORT: String(port), METRICS_PORT: String(await freePort()) }, [preload])
  t.ok(await until(() => listening.stderr().includes('lookup')), 'start-up reached the listener')
  t.equal(await listening.stop(), 0, 'exit 0, without waiting for the listener')
  t.equal(listening.stderr(), 'lookup\n', 'nothing else on stderr')
  t.match(listening.stdout(), '"shutting down"')

  const probe = createServer()
  probe.listen(port, '127.0.0.1')
  await once(probe, 'listening')
  probe.close()
  t.pass('the port is free again')
})

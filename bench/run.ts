/**
 * The service's benchmarks (issue 7): cost of a full cancel against the same upstream called
 * directly and through a minimal hand-written Node proxy, with the memory store and with Redis;
 * shedding under a flood; a soak; start-up time. Everything on loopback, every run bounded.
 *
 *   npm run build && npm run bench          full: medians of 5 interleaved rounds, PASS/FAIL
 *   npm run bench:quick                     CI: each scenario once, briefly, no assertions
 *
 * Processes: the built service (`node dist/server.js`, production logging: pino JSON at `info`
 * to stdout, which goes to /dev/null) pinned to core 0; this driver (autocannon), the fixed-answer
 * upstream (bench/upstream.mjs), the minimal proxy (bench/proxy.mjs, on core 0 like the service),
 * a throwaway redis-server and the ID-token issuer on core 1.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { readFileSync, existsSync, mkdtempSync, readdirSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { once } from 'node:events'
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { cpus, loadavg, totalmem } from 'node:os'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import { dirname, join } from 'node:path'
import autocannon, { type Options as CannonOptions, type Result as CannonResult } from 'autocannon'
import { startIssuer, type TestIssuer } from '../test/helpers/issuer.js'
import { freePort } from '../test/helpers/ports.js'

const QUICK = process.argv.includes('--quick')
const PROFILE = process.argv.includes('--profile')
const BUNDLE_PROFILE = process.env.BENCH_PROFILE_BUNDLE === '1'
/** `--profile` of the shedding path: a flood from one address over RATE_LIMIT_IP, as in the shedding scenario. */
const SHED_PROFILE = process.env.BENCH_PROFILE_SHED === '1'
const COMPARE = process.argv.includes('--compare')
const INSTRUCTIONS = process.argv.includes('--instructions')
const SOAK_ONLY = process.argv.includes('--soak')
const SHED_ONLY = process.argv.includes('--shed')
/** Where the full run's shedding scenario generates its flood (see `shedding`). */
const SHED_FLOOD: 'driver' | 'process' = process.env.BENCH_SHED_FLOOD === 'process' ? 'process' : 'driver'
const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..')
const SERVICE_CORE = '0'
/** The Node that runs every measured process (service, proxies, upstream): BENCH_NODE, else this one. */
const NODE = process.env.BENCH_NODE ?? process.execPath
const LOAD_CORE = '1'
/**
 * The Node options production runs the service with: `npm start`'s (package.json), which the
 * image's CMD repeats (.ci/container-check.sh checks that). A variant's own options come after
 * them, and Node takes the last of a repeated option.
 */
const SERVICE_NODE_OPTIONS = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { scripts: { start: string } })
  .scripts.start.split(' ').filter((word) => word.startsWith('--'))
/** How long a process may take to listen or be ready; under callgrind, Node starts ~50 times slower. */
const READY_TIMEOUT_MS = INSTRUCTIONS ? 600_000 : 15_000

const MODE = QUICK
  ? { rounds: 1, maxSec: 1, rateSec: 1, warmSec: 0.2, shedSec: 1, soakWarmSec: 1, soakSec: 3, soakRate: 1000, startups: 1 }
  : { rounds: 5, maxSec: 5, rateSec: 5, warmSec: 1, shedSec: 5, soakWarmSec: 30, soakSec: 60, soakRate: 2000, startups: 7 }
const FIXED_RATE = 2000
const MAX_CONNECTIONS = 20
const RATE_CONNECTIONS = 20
const SHED = { ipLimit: 200, legitRate: 50, floodConnections: 16 }

const API_KEY = 'bench-org-key-0123456789abcdef'
const APPOINTMENT_ID = '3f0b5d2e-8a41-4c1e-9f27-1a6d3c8e5b01'
const EMAIL = 'alice@example.com'
const CANCEL_PATH = '/api/v1/calendar/appointments/cancel'
const HIGH = '999999999/1m'

// ---------------------------------------------------------------------------------------------
// Processes

const hasTaskset = spawnSync('taskset', ['-V']).status === 0
const children = new Set<ChildProcess>()

function pinned (core: string, command: string, args: string[]): [string, string[]] {
  return hasTaskset ? ['taskset', ['-c', core, command, ...args]] : [command, args]
}

function pinSelf (core: string): void {
  if (hasTaskset) spawnSync('taskset', ['-a', '-pc', core, String(process.pid)], { stdio: 'ignore' })
}

interface Proc { name: string, child: ChildProcess, pid: number, stderr: () => string }

/** `--instructions`: the measured Node processes run under this (callgrind), the others do not. */
let measuredWrapper: ((name: string) => string[]) | null = null

function launch (name: string, core: string, command: string, args: string[], env: Record<string, string>, stdout: 'ignore' | 'pipe'): Proc {
  // Every process on the service's core is a measured Node (a proxy, the service on its Node).
  const wrapper = core === SERVICE_CORE && measuredWrapper !== null ? measuredWrapper(name) : []
  const [cmd, argv] = wrapper.length === 0 ? pinned(core, command, args) : pinned(core, wrapper[0] as string, [...wrapper.slice(1), command, ...args])
  const child = spawn(cmd, argv, { cwd: ROOT, env: { PATH: process.env.PATH ?? '', ...env }, stdio: ['ignore', stdout, 'pipe'] })
  children.add(child)
  child.on('exit', () => children.delete(child))
  let errText = ''
  child.stderr?.on('data', (chunk: Buffer) => { errText = (errText + chunk.toString()).slice(-4000) })
  if (child.pid === undefined) throw new Error(`${name} did not start`)
  return { name, child, pid: child.pid, stderr: () => errText }
}

/** A helper process that prints {"port":N} when it listens (upstream, proxy). */
async function launchListening (name: string, core: string, script: string, env: Record<string, string>): Promise<Proc & { url: string }> {
  const proc = launch(name, core, NODE, [script], env, 'pipe')
  const line = await new Promise<string>((resolve, reject) => {
    let text = ''
    const timer = setTimeout(() => reject(new Error(`${name} did not listen: ${proc.stderr()}`)), READY_TIMEOUT_MS)
    proc.child.stdout?.on('data', (chunk: Buffer) => {
      text += chunk.toString()
      const end = text.indexOf('\n')
      if (end >= 0) { clearTimeout(timer); resolve(text.slice(0, end)) }
    })
    proc.child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`${name} exited (${String(code)}): ${proc.stderr()}`)) })
  })
  const { port } = JSON.parse(line) as { port: number }
  return { ...proc, url: `http://127.0.0.1:${port}` }
}

async function stop (proc: Proc): Promise<void> {
  if (proc.child.exitCode !== null || proc.child.signalCode !== null) return
  const exited = once(proc.child, 'exit')
  proc.child.kill('SIGTERM')
  const timer = setTimeout(() => proc.child.kill('SIGKILL'), 12_000)
  await exited
  clearTimeout(timer)
}

process.on('exit', () => { for (const child of children) child.kill('SIGKILL') })
for (const signal of ['SIGINT', 'SIGTERM'] as const) process.on(signal, () => process.exit(130))

/** /readyz until 200 (and the wanted shared-state mode); returns ms since `since`. */
async function waitReady (url: string, since: number, proc: Proc, mode?: string): Promise<number> {
  const end = Date.now() + READY_TIMEOUT_MS
  for (;;) {
    try {
      const response = await fetch(`${url}/readyz`)
      const body = await response.json() as { data?: { sharedState?: string } }
      if (response.status === 200 && (mode === undefined || body.data?.sharedState === mode)) return performance.now() - since
    } catch {}
    if (proc.child.exitCode !== null) throw new Error(`${proc.name} exited: ${proc.stderr()}`)
    if (Date.now() > end) throw new Error(`${proc.name} not ready in ${READY_TIMEOUT_MS / 1000} s: ${proc.stderr()}`)
    await sleep(INSTRUCTIONS ? 200 : 2)
  }
}

interface Service extends Proc { url: string, metricsUrl: string, startupMs: number, startupCpuMs: number }

async function startService (name: string, env: Record<string, string>, mode?: string, nodeArgs: string[] = [], entry = 'dist/server.js', node = NODE): Promise<Service> {
  try {
    return await startServiceOnce(name, env, mode, nodeArgs, entry, node)
  } catch (error) {
    // freePort's port was free a moment ago; any process's outgoing socket may have taken it
    // since (the service then exits at once on EADDRINUSE). One more try, on fresh ports.
    process.stderr.write(`${name}: start failed (${(error as Error).message.slice(0, 120)}); trying once more on fresh ports\n`)
    return await startServiceOnce(name, env, mode, nodeArgs, entry, node)
  }
}

async function startServiceOnce (name: string, env: Record<string, string>, mode: string | undefined, nodeArgs: string[], entry: string, node: string): Promise<Service> {
  const port = await freePort()
  const metricsPort = await freePort()
  const t0 = performance.now()
  // Production logging: pino JSON at info to stdout; stdout is /dev/null (a log shipper's pipe).
  const proc = launch(name, SERVICE_CORE, node, [...SERVICE_NODE_OPTIONS, ...nodeArgs, entry], {
    NODE_ENV: 'production',
    HOST: '127.0.0.1',
    PORT: String(port),
    METRICS_PORT: String(metricsPort),
    LOG_LEVEL: 'info',
    ...env
  }, 'ignore')
  const url = `http://127.0.0.1:${port}`
  const startupMs = await waitReady(url, t0, proc, mode)
  return { ...proc, url, metricsUrl: `http://127.0.0.1:${metricsPort}/metrics`, startupMs, startupCpuMs: cpuSeconds(proc.pid) * 1000 }
}

async function signIn (service: Service, issuer: TestIssuer, email: string): Promise<string> {
  const idToken = await issuer.sign({ email, sub: `sub-${email}` })
  const response = await fetch(`${service.url}/auth/session`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ idToken })
  })
  if (response.status !== 201) throw new Error(`sign-in failed: ${response.status} ${await response.text()}`)
  return ((await response.json()) as { data: { token: string } }).data.token
}

/**
 * The service's environment in every scenario: the fixed-answer upstream, the local issuer, the
 * org budget and per-client limits far above the load (the budget's log holds one entry per call
 * in its window, so the window is short), and the ownership check off unless a scenario says so.
 */
function serviceEnv (upstream: { url: string }, issuer: TestIssuer): Record<string, string> {
  return {
    CV_API_KEY: API_KEY,
    CV_BASE_URL: upstream.url,
    OIDC_ISSUER: issuer.url,
    OIDC_CLIENT_ID: issuer.clientId,
    CV_RATE_LIMIT: '999999999/1s',
    RATE_LIMIT_IP: HIGH,
    RATE_LIMIT_SESSION: HIGH,
    RATE_LIMIT_CANCEL: HIGH,
    OWNERSHIP_CHECK: 'off'
  }
}

/**
 * BENCH_VARIANTS=a/server.js,b/server.js: other builds of the service for --compare (in the same
 * rounds, A/B), --soak and --instructions. An entry may start with environment variables and then
 * Node options, which come after production's: 'MALLOC_ARENA_MAX=2 --max-semi-space-size=16 dist/server.js'.
 * BENCH_NODE=<path> among its variables runs that entry on another Node (the proxies and the
 * upstream stay on the run's): 'BENCH_NODE=/path/to/node22 dist/server.js'.
 */
function benchVariants (): string[] {
  return (process.env.BENCH_VARIANTS ?? '').split(',').filter((entry) => entry.trim() !== '')
}

async function startVariant (name: string, variant: string, upstream: { url: string }, issuer: TestIssuer): Promise<Service> {
  const words = variant.trim().split(/\s+/)
  // Leading NAME=value words are the variant's own environment, as in a shell.
  const env: Record<string, string> = {}
  while (words.length > 1 && /^[A-Z_][A-Z0-9_]*=/.test(words[0] as string)) {
    const [assignment] = words.splice(0, 1) as [string]
    const at = assignment.indexOf('=')
    env[assignment.slice(0, at)] = assignment.slice(at + 1)
  }
  const { BENCH_NODE: node = NODE, ...own } = env
  return await startService(name, { ...serviceEnv(upstream, issuer), ...extraServiceEnv(), ...own }, undefined, words.slice(0, -1), words.at(-1), node)
}

/** BENCH_SERVICE_ENV (JSON): extra environment for the service of --compare and --profile. */
function extraServiceEnv (): Record<string, string> {
  return JSON.parse(process.env.BENCH_SERVICE_ENV ?? '{}') as Record<string, string>
}

// /proc accounting of one process.
const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK']).stdout?.toString().trim()) || 100

function cpuSeconds (pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command name.
  return (Number(fields[11]) + Number(fields[12])) / CLK_TCK
}

function memoryKiB (pid: number, field: 'VmHWM' | 'VmRSS'): number {
  const match = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
  return match === null ? NaN : Number(match[1])
}

// ---------------------------------------------------------------------------------------------
// Load

interface Target {
  name: string
  url: string
  path: string
  headers: Record<string, string>
  /** The n-th request's body: every body differs (see `cancelTarget`). */
  body: (n: number) => string
  /** The process whose CPU is charged to the requests (null: not measured). */
  pid: number | null
}

interface LoadResult {
  seconds: number
  responses: number
  rps: number
  codes: Record<string, number>
  errors: number
  /** Latencies (ms) of the 2xx answers, sorted. */
  ok: Float64Array
  /** Latencies (ms) of the 429 answers, sorted. */
  shed: Float64Array
  cpuUsPerRequest: number | null
  /** Share of one core the measured process used. */
  cpuShare: number | null
}

let sequence = 0

function run (target: Target, options: { seconds: number, connections: number, rate?: number, amount?: number }): Promise<LoadResult> {
  const ok: number[] = []
  const shed: number[] = []
  const cannon: CannonOptions = {
    url: target.url,
    connections: options.connections,
    ...(options.amount === undefined ? { duration: options.seconds } : { amount: options.amount }),
    timeout: INSTRUCTIONS ? 120 : 10,
    requests: [{
      method: 'POST',
      path: target.path,
      headers: target.headers,
      setupRequest: (request) => ({ ...request, body: target.body(sequence++) })
    }],
    ...(options.rate === undefined ? {} : { overallRate: options.rate })
  }
  const cpuBefore = target.pid === null ? 0 : cpuSeconds(target.pid)
  const t0 = performance.now()
  return new Promise((resolve, reject) => {
    const instance = autocannon(cannon, (error: Error | null, result: CannonResult) => {
      if (error !== null) { reject(error); return }
      const seconds = (performance.now() - t0) / 1000
      const cpu = target.pid === null ? null : cpuSeconds(target.pid) - cpuBefore
      const codes: Record<string, number> = {}
      for (const [code, { count }] of Object.entries(result.statusCodeStats)) codes[code] = count
      const responses = Object.values(codes).reduce((a, b) => a + b, 0)
      resolve({
        seconds,
        responses,
        rps: responses / seconds,
        codes,
        errors: result.errors + result.timeouts,
        ok: Float64Array.from(ok).sort(),
        shed: Float64Array.from(shed).sort(),
        cpuUsPerRequest: cpu === null || responses === 0 ? null : cpu * 1e6 / responses,
        cpuShare: cpu === null ? null : cpu / seconds
      })
    })
    instance.on('response', (_client: unknown, status: number, _bytes: number, ms: number) => {
      if (status >= 200 && status < 300) ok.push(ms)
      else if (status === 429) shed.push(ms)
    })
  })
}

async function measure (target: Target, options: { seconds: number, connections: number, rate?: number }): Promise<LoadResult> {
  await run(target, { ...options, seconds: MODE.warmSec })
  return run(target, options)
}

function quantile (sorted: Float64Array, q: number): number {
  if (sorted.length === 0) return NaN
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))] as number
}

function median (values: number[]): number {
  const sorted = values.filter((v) => Number.isFinite(v)).sort((a, b) => a - b)
  if (sorted.length === 0) return NaN
  const mid = Math.floor(sorted.length / 2)
  return sorted.length % 2 === 1 ? sorted[mid] as number : ((sorted[mid - 1] as number) + (sorted[mid] as number)) / 2
}

/** Checks that a run got the answers it should; a benchmark of errors measures nothing. */
function expectOnly (label: string, result: LoadResult, codes: string[]): void {
  const wrong = Object.entries(result.codes).filter(([code]) => !codes.includes(code))
  if (result.errors > 0 || wrong.length > 0 || result.responses === 0) {
    throw new Error(`${label}: unexpected answers ${JSON.stringify(result.codes)}, ${result.errors} errors/timeouts`)
  }
}

/**
 * A cancel through the service (or the proxy). Every request carries a different reason: without
 * an Idempotency-Key, identical cancels within 500 ms share one upstream call (single-flight),
 * which would measure the cache instead of the path.
 */
function cancelTarget (name: string, url: string, token: string, pid: number | null, ip?: string): Target {
  return {
    name,
    url,
    path: `/appointments/${APPOINTMENT_ID}/cancel`,
    headers: {
      authorization: `Bearer ${token}`,
      'content-type': 'application/json',
      ...(ip === undefined ? {} : { 'x-forwarded-for': ip })
    },
    body: (n) => `{"reason":"bench ${n}"}`,
    pid
  }
}

function directTarget (url: string): Target {
  return {
    name: 'direct',
    url,
    path: CANCEL_PATH,
    headers: { 'cv-api-key': API_KEY, 'content-type': 'application/json' },
    body: (n) => `{"email":"${EMAIL}","appointmentId":"${APPOINTMENT_ID}","reason":"bench ${n}"}`,
    pid: null
  }
}

// ---------------------------------------------------------------------------------------------
// Scenarios

const fmt = (value: number, digits = 2): string => Number.isFinite(value) ? value.toFixed(digits) : 'n/a'
const mib = (kib: number): number => kib / 1024

async function main (): Promise<void> {
  if (!existsSync(join(ROOT, 'dist/server.js'))) throw new Error('dist/server.js is missing: run `npm run build` first')
  pinSelf(LOAD_CORE)
  const began = performance.now()
  console.log(`# care360-patient-bff benchmarks (${QUICK ? 'quick: each scenario once, briefly; no targets checked' : `full: medians of ${MODE.rounds} interleaved rounds`})`)
  console.log(`machine: ${cpus().length} cores (${cpus()[0]?.model ?? '?'}), ${(totalmem() / 2 ** 30).toFixed(1)} GiB, Node ${spawnSync(NODE, ['--version']).stdout.toString().trim()} (driver: ${process.version}); ` +
    (hasTaskset ? `service and proxy pinned to core ${SERVICE_CORE}, load generator, upstream and Redis to core ${LOAD_CORE}` : 'taskset missing: NOT pinned'))

  console.log(`load average at start: ${loadavg().map((l) => l.toFixed(2)).join(' ')} (anything above ~0.5 means other work shares these 2 cores)`)
  if (PROFILE) { await profile(); return }
  if (COMPARE) { await compare(); return }
  if (INSTRUCTIONS) { await instructions(); return }
  if (SOAK_ONLY) { await soakOnly(); return }
  if (SHED_ONLY) { await shedOnly(); return }
  const issuer = await startIssuer({ teardown: () => {} })
  const upstream = await launchListening('upstream', LOAD_CORE, 'bench/upstream.mjs', { CV_API_KEY: API_KEY, APPOINTMENT_ID })
  const redisPort = await freePort()
  const redis = launch('redis', LOAD_CORE, 'redis-server', ['--port', String(redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--protected-mode', 'no', '--loglevel', 'warning'], {}, 'ignore')
  const proxy = await launchListening('proxy', SERVICE_CORE, 'bench/proxy.mjs', { CV_API_KEY: API_KEY, UPSTREAM_URL: upstream.url, PATIENT_EMAIL: EMAIL })

  const baseEnv = serviceEnv(upstream, issuer)
  const redisUrl = `redis://127.0.0.1:${redisPort}`
  const memory = await startService('service (memory)', baseEnv)
  const owned = await startService('service (memory, ownership on)', { ...baseEnv, OWNERSHIP_CHECK: 'on' })
  const shared = await startService('service (redis)', { ...baseEnv, REDIS_URL: redisUrl }, 'redis')

  const targets: Target[] = [
    directTarget(upstream.url),
    cancelTarget('proxy', proxy.url, 'unused-by-the-proxy', proxy.pid),
    cancelTarget('service, memory', memory.url, await signIn(memory, issuer, EMAIL), memory.pid),
    cancelTarget('service, memory, ownership on', owned.url, await signIn(owned, issuer, EMAIL), owned.pid),
    cancelTarget('service, redis', shared.url, await signIn(shared, issuer, EMAIL), shared.pid)
  ]

  // 1. Throughput (closed loop, fixed connections) and latency at a fixed rate, interleaved:
  //    every round runs every contender, in an order rotated per round.
  const maxRuns = new Map<string, LoadResult[]>()
  const rateRuns = new Map<string, LoadResult[]>()
  for (const t of targets) { maxRuns.set(t.name, []); rateRuns.set(t.name, []) }
  for (let round = 0; round < MODE.rounds; round++) {
    const order = targets.map((_, i) => targets[(i + round) % targets.length] as Target)
    for (const target of order) {
      const result = await measure(target, { seconds: MODE.maxSec, connections: MAX_CONNECTIONS })
      expectOnly(`${target.name} (max)`, result, ['200'])
      maxRuns.get(target.name)?.push(result)
    }
    for (const target of order) {
      const result = await measure(target, { seconds: MODE.rateSec, connections: RATE_CONNECTIONS, rate: FIXED_RATE })
      expectOnly(`${target.name} (${FIXED_RATE}/s)`, result, ['200'])
      rateRuns.get(target.name)?.push(result)
    }
    process.stderr.write(`round ${round + 1}/${MODE.rounds} done (${fmt((performance.now() - began) / 1000, 0)} s)\n`)
  }

  // Ratios and added latency are taken per round (side by side), then the median of rounds.
  const perRound = (name: string, pick: (mine: LoadResult, round: number) => number): number =>
    median((maxRuns.get(name) ?? []).map((mine, round) => pick(mine, round)))
  const ratio = (name: string): number => perRound(name, (mine, round) => mine.rps / ((maxRuns.get('proxy') ?? [])[round] as LoadResult).rps)
  const added = (name: string, q: number): number => median((rateRuns.get(name) ?? []).map((mine, round) =>
    quantile(mine.ok, q) - quantile(((rateRuns.get('direct') ?? [])[round] as LoadResult).ok, q)))
  const med = (runs: Map<string, LoadResult[]>, name: string, pick: (r: LoadResult) => number | null): number =>
    median((runs.get(name) ?? []).map((r) => pick(r) ?? NaN))

  const peakKiB: Record<string, number> = {
    proxy: memoryKiB(proxy.pid, 'VmHWM'),
    'service, memory': memoryKiB(memory.pid, 'VmHWM'),
    'service, memory, ownership on': memoryKiB(owned.pid, 'VmHWM'),
    'service, redis': memoryKiB(shared.pid, 'VmHWM')
  }

  console.log(`\n## Full cancel path (${MAX_CONNECTIONS} connections closed loop; ${FIXED_RATE} req/s fixed rate with ${RATE_CONNECTIONS} connections)\n`)
  console.log('| contender | req/s (max) | × proxy | core use | CPU µs/req (max) | CPU µs/req (@2000/s) | p50 ms | p99 ms | +p50 ms vs direct | +p99 ms vs direct | peak RSS MiB |')
  console.log('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
  for (const t of targets) {
    const isDirect = t.name === 'direct'
    console.log(`| ${t.name} | ${fmt(med(maxRuns, t.name, (r) => r.rps), 0)} | ${t.name === 'proxy' || isDirect ? '—' : fmt(ratio(t.name))} | ` +
      `${isDirect ? '—' : `${fmt(100 * med(maxRuns, t.name, (r) => r.cpuShare), 0)}%`} | ` +
      `${isDirect ? '—' : fmt(med(maxRuns, t.name, (r) => r.cpuUsPerRequest), 1)} | ${isDirect ? '—' : fmt(med(rateRuns, t.name, (r) => r.cpuUsPerRequest), 1)} | ` +
      `${fmt(med(rateRuns, t.name, (r) => quantile(r.ok, 0.5)), 3)} | ${fmt(med(rateRuns, t.name, (r) => quantile(r.ok, 0.99)), 3)} | ` +
      `${isDirect ? '—' : fmt(added(t.name, 0.5), 3)} | ${isDirect ? '—' : fmt(added(t.name, 0.99), 3)} | ${isDirect ? '—' : fmt(mib(peakKiB[t.name] ?? NaN), 1)} |`)
  }
  console.log('\nThe direct call is the load generator against the upstream itself (its latency is the baseline; its req/s is bounded by the shared load core).')
  console.log('"ownership on": the same appointment is cancelled again and again, so it is never in the cached list (a cancel drops it), and each cancel costs a list call and a cancel call upstream.')

  await Promise.all([stop(memory), stop(owned), stop(shared)])

  // 2. Shedding: a flood from one client IP far above RATE_LIMIT_IP, a legitimate client (another
  //    IP, its own session) at a fixed rate below it.
  //    The quick mode runs the flood in both places, so that CI proves both run.
  const { legitFactor, legitAlwaysOk, shedVsProxy } = await shedding(baseEnv, issuer, proxy, QUICK ? [SHED_FLOOD, SHED_FLOOD === 'driver' ? 'process' : 'driver'] : [SHED_FLOOD])

  // 3. Soak: a fresh service (memory store, ownership on: the most state per request) at a
  //    steady rate. A warm-up at the same rate first, unsampled: V8 grows its heap to its working
  //    size over the first tens of seconds (Node 24's takes about 25 s at this rate), which is a
  //    start, not a trend. Then resident memory sampled every second and a least-squares slope
  //    over the last three quarters of the samples.
  const soaker = await startService('service (soak)', { ...baseEnv, OWNERSHIP_CHECK: 'on' })
  const soakTarget = cancelTarget('soak', soaker.url, await signIn(soaker, issuer, EMAIL), soaker.pid)
  const soakStart = mib(memoryKiB(soaker.pid, 'VmRSS'))
  expectOnly('soak (warm-up)', await run(soakTarget, { seconds: MODE.soakWarmSec, connections: RATE_CONNECTIONS, rate: MODE.soakRate }), ['200'])
  const samples: Array<[number, number]> = []
  const sampler = setInterval(() => { samples.push([performance.now() / 1000, mib(memoryKiB(soaker.pid, 'VmRSS'))]) }, 1000)
  const soaked = await run(soakTarget, { seconds: MODE.soakSec, connections: RATE_CONNECTIONS, rate: MODE.soakRate })
  clearInterval(sampler)
  expectOnly('soak', soaked, ['200'])
  const soakEnd = mib(memoryKiB(soaker.pid, 'VmRSS'))
  const steady = samples.slice(Math.floor(samples.length / 4))
  const slope = fitSlope(steady)
  const steadySpan = steady.length > 1 ? (steady[steady.length - 1] as [number, number])[0] - (steady[0] as [number, number])[0] : 0
  const growth = slope * steadySpan
  console.log(`\n## Soak (${MODE.soakSec} s at ${MODE.soakRate} req/s after a ${MODE.soakWarmSec} s warm-up at that rate, ${soaked.responses} cancels measured; memory store, ownership on)\n`)
  console.log('| RSS at start MiB | RSS after warm-up MiB | RSS at end MiB | peak RSS MiB | slope over the last 3/4 MiB/min | fitted growth over the last 3/4 MiB |')
  console.log('| ---: | ---: | ---: | ---: | ---: | ---: |')
  console.log(`| ${fmt(soakStart, 1)} | ${fmt(samples[0]?.[1] ?? NaN, 1)} | ${fmt(soakEnd, 1)} | ${fmt(mib(memoryKiB(soaker.pid, 'VmHWM')), 1)} | ${fmt(slope * 60)} | ${fmt(growth)} |`)
  await stop(soaker)

  // 4. Start-up: spawn to the first /readyz 200, a fresh process each time.
  const startups: number[] = []
  const redisStartups: number[] = []
  const startupCpu: number[] = []
  const redisStartupCpu: number[] = []
  for (let i = 0; i < MODE.startups; i++) {
    const one = await startService('service (start-up)', baseEnv)
    startups.push(one.startupMs)
    startupCpu.push(one.startupCpuMs)
    await stop(one)
    const two = await startService('service (start-up, redis)', { ...baseEnv, REDIS_URL: redisUrl }, 'redis')
    redisStartups.push(two.startupMs)
    redisStartupCpu.push(two.startupCpuMs)
    await stop(two)
  }
  console.log(`\n## Start-up (spawn of \`${['node', ...SERVICE_NODE_OPTIONS, 'dist/server.js'].join(' ')}\` to the first /readyz 200; ${MODE.startups} runs)\n`)
  console.log('| store | median ms | min ms | max ms | CPU ms used until ready (median) |')
  console.log('| --- | ---: | ---: | ---: | ---: |')
  console.log(`| memory | ${fmt(median(startups), 0)} | ${fmt(Math.min(...startups), 0)} | ${fmt(Math.max(...startups), 0)} | ${fmt(median(startupCpu), 0)} |`)
  console.log(`| redis (until sharedState is "redis") | ${fmt(median(redisStartups), 0)} | ${fmt(Math.min(...redisStartups), 0)} | ${fmt(Math.max(...redisStartups), 0)} | ${fmt(median(redisStartupCpu), 0)} |`)

  await Promise.all([stop(proxy), stop(upstream), stop(redis)])
  await issuer.close()
  console.log(`\ntotal ${fmt((performance.now() - began) / 1000, 0)} s; load average at end: ${loadavg().map((l) => l.toFixed(2)).join(' ')}`)

  if (QUICK) return
  const memCpu = med(rateRuns, 'service, memory', (r) => r.cpuUsPerRequest)
  const checks: Array<[string, boolean, string]> = [
    ['memory store: ≥ 60% of the proxy', ratio('service, memory') >= 0.6, fmt(ratio('service, memory'))],
    ['memory store: ≤ ~85 µs CPU per request (at 2000 req/s)', memCpu <= 85, fmt(memCpu, 1)],
    ['memory store: +p50 ≤ 0.4 ms over direct at 2000 req/s', added('service, memory', 0.5) <= 0.4, fmt(added('service, memory', 0.5), 3)],
    ['memory store: +p99 ≤ 1.5 ms over direct at 2000 req/s', added('service, memory', 0.99) <= 1.5, fmt(added('service, memory', 0.99), 3)],
    ['memory store: peak RSS ≤ 150 MiB', mib(peakKiB['service, memory'] ?? NaN) <= 150, fmt(mib(peakKiB['service, memory'] ?? NaN), 1)],
    ['redis store: ≥ 40% of the proxy', ratio('service, redis') >= 0.4, fmt(ratio('service, redis'))],
    ['shedding: 429/s ≥ proxy req/s', shedVsProxy >= 1, fmt(shedVsProxy)],
    ['shedding: legit p99 under flood ≤ 2× unloaded', legitFactor <= 2 && legitAlwaysOk, fmt(legitFactor)],
    ['soak: no RSS growth trend (fitted growth < 5 MiB)', growth < 5, `${fmt(growth)} MiB`],
    ['start-up to ready < 1 s', median(startups) < 1000, `${fmt(median(startups), 0)} ms`]
  ]
  console.log('\n## Targets (issue 7)\n')
  for (const [what, pass, value] of checks) console.log(`${pass ? 'PASS' : 'FAIL'}  ${what}: ${value}`)
  if (checks.some(([, pass]) => !pass)) process.exitCode = 1
}

type FloodPlace = 'driver' | 'process'
interface ShedRound { unloadedP99: number, loadedP99: number, admittedP99: number, shedPerSec: number, admittedPerSec: number, shedP99: number, legitRefused: number, proxyRps: number, driverDelayP99: number }

/**
 * The shedding scenario: a flood from one client IP far above RATE_LIMIT_IP, and a legitimate
 * client (another IP, its own session) at a fixed rate below it, whose p99 is compared with and
 * without the flood. The client IP comes from X-Forwarded-For, believed from loopback
 * (TRUST_PROXY), as behind a load balancer. `places`: where the flood's load generator runs, in
 * this driver (beside the legitimate client's timing) or in a process of its own on the same core
 * (bench/flood.mjs); with both, each round measures both, in an order alternated per round.
 */
async function shedding (baseEnv: Record<string, string>, issuer: TestIssuer, proxy: Proc & { url: string }, places: FloodPlace[]): Promise<{ legitFactor: number, legitAlwaysOk: boolean, shedVsProxy: number }> {
  const shedder = await startService('service (shedding)', {
    ...baseEnv, RATE_LIMIT_IP: `${SHED.ipLimit}/1s`, TRUST_PROXY: '127.0.0.1'
  })
  const legitToken = await signIn(shedder, issuer, EMAIL)
  // Each run of the legitimate client comes from a fresh address: per-IP windows are fixed (they
  // start at a client's first hit), and a run must not inherit the previous run's count.
  const legit = (round: number, phase: number): Target => cancelTarget('legit', shedder.url, legitToken, null, `10.1.${round}.${phase}`)
  const flood = cancelTarget('flood', shedder.url, await signIn(shedder, issuer, 'flood@example.com'), shedder.pid, '10.2.0.1')
  const rounds = new Map<FloodPlace, ShedRound[]>(places.map((place) => [place, []]))
  // The proxy forwarding over as many connections as the flood, in each round just before it: the
  // shed rate is compared side by side, not with a figure from minutes earlier.
  const proxyAsFlood = cancelTarget('proxy', proxy.url, 'unused-by-the-proxy', proxy.pid)
  let phase = 0
  for (let round = 0; round < MODE.rounds; round++) {
    const proxyRun = await measure(proxyAsFlood, { seconds: MODE.shedSec, connections: SHED.floodConnections })
    expectOnly('proxy (as the flood)', proxyRun, ['200'])
    await run(legit(round, phase++), { seconds: MODE.warmSec, connections: 5, rate: SHED.legitRate })
    const unloaded = await run(legit(round, phase++), { seconds: MODE.shedSec, connections: 5, rate: SHED.legitRate })
    expectOnly('legit (unloaded)', unloaded, ['200', '429'])
    const order = round % 2 === 0 ? places : [...places].reverse()
    for (const place of order) {
      await run(flood, { seconds: MODE.warmSec, connections: SHED.floodConnections })
      const delay = monitorEventLoopDelay({ resolution: 1 })
      const legitRun = (): Promise<LoadResult> => {
        delay.enable()
        return run(legit(round, phase++), { seconds: MODE.shedSec, connections: 5, rate: SHED.legitRate }).finally(() => { delay.disable() })
      }
      const [loaded, flooded] = place === 'driver'
        ? await Promise.all([legitRun(), run(flood, { seconds: MODE.shedSec, connections: SHED.floodConnections })])
        : await floodElsewhere(flood, MODE.shedSec, legitRun)
      expectOnly('legit (under flood)', loaded, ['200', '429'])
      expectOnly('flood', flooded, ['200', '429'])
      rounds.get(place)?.push({
        unloadedP99: quantile(unloaded.ok, 0.99),
        loadedP99: quantile(loaded.ok, 0.99),
        admittedP99: quantile(flooded.ok, 0.99),
        shedPerSec: (flooded.codes['429'] ?? 0) / flooded.seconds,
        admittedPerSec: (flooded.codes['200'] ?? 0) / flooded.seconds,
        shedP99: quantile(flooded.shed, 0.99),
        legitRefused: (unloaded.codes['429'] ?? 0) + (loaded.codes['429'] ?? 0),
        proxyRps: proxyRun.rps,
        driverDelayP99: delay.percentile(99) / 1e6
      })
    }
  }
  await stop(shedder)
  console.log(`\n## Shedding (RATE_LIMIT_IP=${SHED.ipLimit}/1s; flood: ${SHED.floodConnections} connections closed loop from one IP; legitimate client: ${SHED.legitRate} req/s from another IP)\n`)
  console.log('| flood generated in | 429/s | 429 p99 ms | flood admitted/s | flood admitted p99 ms | legit p99 unloaded ms | legit p99 under flood ms | legit under flood ÷ unloaded | 429/s ÷ proxy req/s (same round) | driver\'s event-loop delay p99 ms (under flood) |')
  console.log('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
  const verdicts = places.map((place) => {
    const all = rounds.get(place) ?? []
    const shedMed = (pick: (r: ShedRound) => number): number => median(all.map(pick))
    const legitFactor = shedMed((r) => r.loadedP99 / r.unloadedP99)
    const shedVsProxy = shedMed((r) => r.shedPerSec / r.proxyRps)
    console.log(`| ${place === 'driver' ? 'the driver' : 'its own process'} | ${fmt(shedMed((r) => r.shedPerSec), 0)} | ${fmt(shedMed((r) => r.shedP99), 3)} | ${fmt(shedMed((r) => r.admittedPerSec), 0)} | ${fmt(shedMed((r) => r.admittedP99), 3)} | ` +
      `${fmt(shedMed((r) => r.unloadedP99), 3)} | ${fmt(shedMed((r) => r.loadedP99), 3)} | ${fmt(legitFactor)} | ${fmt(shedVsProxy)} | ${fmt(shedMed((r) => r.driverDelayP99), 3)} |`)
    const legitRefused = all.reduce((sum, r) => sum + r.legitRefused, 0)
    if (legitRefused > 0) console.log(`\nWARNING: the legitimate client (below its limit) got ${legitRefused} 429s in all (a fixed window counts a late burst of the load generator).`)
    return { legitFactor, legitAlwaysOk: legitRefused === 0, shedVsProxy }
  })
  return verdicts[0] as { legitFactor: number, legitAlwaysOk: boolean, shedVsProxy: number }
}

/**
 * The flood from a process of its own on the load core (bench/flood.mjs), for `seconds` plus the
 * time `during` takes beyond them; `during` (the legitimate client's run) starts once it has.
 */
async function floodElsewhere (target: Target, seconds: number, during: () => Promise<LoadResult>): Promise<[LoadResult, LoadResult]> {
  const proc = launch('flood', LOAD_CORE, process.execPath, ['bench/flood.mjs'], {
    FLOOD: JSON.stringify({ url: target.url, path: target.path, headers: target.headers, seconds: seconds + 1, connections: SHED.floodConnections })
  }, 'pipe')
  const lines: string[] = []
  let text = ''
  let started: () => void = () => {}
  const startedOnce = new Promise<void>((resolve) => { started = resolve })
  proc.child.stdout?.on('data', (chunk: Buffer) => {
    text += chunk.toString()
    for (let end = text.indexOf('\n'); end >= 0; end = text.indexOf('\n')) {
      lines.push(text.slice(0, end))
      text = text.slice(end + 1)
      if (lines.length === 1) started()
    }
  })
  // 'close', not 'exit': the result's line may still be in the pipe when the process exits.
  const exited = once(proc.child, 'close')
  await Promise.race([startedOnce, exited])
  if (lines.length === 0) throw new Error(`flood exited: ${proc.stderr()}`)
  const loaded = await during()
  await exited
  const last = lines[1]
  if (last === undefined) throw new Error(`flood ended without a result: ${proc.stderr()}`)
  const result = JSON.parse(last) as { seconds: number, codes: Record<string, number>, errors: number, ok: number[], shed: number[] }
  const responses = Object.values(result.codes).reduce((a, b) => a + b, 0)
  return [loaded, {
    seconds: result.seconds,
    responses,
    rps: responses / result.seconds,
    codes: result.codes,
    errors: result.errors,
    ok: Float64Array.from(result.ok).sort(),
    shed: Float64Array.from(result.shed).sort(),
    cpuUsPerRequest: null,
    cpuShare: null
  }]
}

/**
 * `--shed`: the shedding scenario alone (section 2 of the full run), with the flood generated in
 * this driver and in a process of its own, side by side in each round.
 */
async function shedOnly (): Promise<void> {
  const issuer = await startIssuer({ teardown: () => {} })
  const upstream = await launchListening('upstream', LOAD_CORE, 'bench/upstream.mjs', { CV_API_KEY: API_KEY, APPOINTMENT_ID })
  const proxy = await launchListening('proxy', SERVICE_CORE, 'bench/proxy.mjs', { CV_API_KEY: API_KEY, UPSTREAM_URL: upstream.url, PATIENT_EMAIL: EMAIL })
  await shedding(serviceEnv(upstream, issuer), issuer, proxy, ['driver', 'process'])
  await Promise.all([stop(proxy), stop(upstream)])
  await issuer.close()
}

/**
 * `--soak`: the soak alone (section 3 of the full run), for each build of BENCH_VARIANTS (default:
 * dist/server.js) side by side, each at its own 2000 req/s, so that a growth trend can be told
 * from one build to another on the same machine at the same time. The V8 heap at the end tells
 * a heap that is still growing to its size from memory held outside it.
 */
async function soakOnly (): Promise<void> {
  const issuer = await startIssuer({ teardown: () => {} })
  const upstream = await launchListening('upstream', LOAD_CORE, 'bench/upstream.mjs', { CV_API_KEY: API_KEY, APPOINTMENT_ID })
  const variants = benchVariants()
  if (variants.length === 0) variants.push('dist/server.js')
  const soakers = await Promise.all(variants.map(async (variant, i) => {
    const service = await startVariant(`service (soak ${i + 1})`, `OWNERSHIP_CHECK=on ${variant}`, upstream, issuer)
    return { variant, service, target: cancelTarget(`soak ${i + 1}`, service.url, await signIn(service, issuer, EMAIL), service.pid), samples: [] as Array<[number, number]> }
  }))
  const load = { connections: RATE_CONNECTIONS, rate: MODE.soakRate }
  await Promise.all(soakers.map(async ({ variant, target }) => { expectOnly(`soak warm-up (${variant})`, await run(target, { ...load, seconds: MODE.soakWarmSec }), ['200']) }))
  const sampler = setInterval(() => {
    for (const soaker of soakers) soaker.samples.push([performance.now() / 1000, mib(memoryKiB(soaker.service.pid, 'VmRSS'))])
  }, 1000)
  await Promise.all(soakers.map(async ({ variant, target }) => { expectOnly(`soak (${variant})`, await run(target, { ...load, seconds: MODE.soakSec }), ['200']) }))
  clearInterval(sampler)
  console.log(`\n## Soak only (${MODE.soakSec} s at ${MODE.soakRate} req/s each, after a ${MODE.soakWarmSec} s warm-up; memory store, ownership on)\n`)
  console.log('| build | RSS after warm-up MiB | RSS at end MiB | peak RSS MiB | slope over the last 3/4 MiB/min | fitted growth MiB | at the end |')
  console.log('| --- | ---: | ---: | ---: | ---: | ---: | --- |')
  for (const { variant, service, samples } of soakers) {
    const steady = samples.slice(Math.floor(samples.length / 4))
    const slope = fitSlope(steady)
    const span = steady.length > 1 ? (steady.at(-1) as [number, number])[0] - (steady[0] as [number, number])[0] : 0
    console.log(`| ${variant} | ${fmt(samples[0]?.[1] ?? NaN, 1)} | ${fmt(samples.at(-1)?.[1] ?? NaN, 1)} | ${fmt(mib(memoryKiB(service.pid, 'VmHWM')), 1)} | ${fmt(slope * 60)} | ${fmt(slope * span)} | ${await heapSummary(service)} |`)
    await stop(service)
  }
}

/**
 * `--compare`: the minimal proxy, a plain Fastify forwarder with request logging and the service
 * (memory store, ownership off, extra environment from BENCH_SERVICE_ENV as JSON), closed loop,
 * 3 interleaved rounds of 4 s: the short loop for work on the service's CPU cost.
 */
async function compare (): Promise<void> {
  const issuer = await startIssuer({ teardown: () => {} })
  const upstream = await launchListening('upstream', LOAD_CORE, 'bench/upstream.mjs', { CV_API_KEY: API_KEY, APPOINTMENT_ID })
  const forwarderEnv = { CV_API_KEY: API_KEY, UPSTREAM_URL: upstream.url, PATIENT_EMAIL: EMAIL }
  const proxy = await launchListening('proxy', SERVICE_CORE, 'bench/proxy.mjs', forwarderEnv)
  const plain = await launchListening('fastify forwarder', SERVICE_CORE, 'bench/fastify-proxy.mjs', forwarderEnv)
  const service = await startService('service (memory)', { ...serviceEnv(upstream, issuer), ...extraServiceEnv() })
  const variants = benchVariants()
  const others = await Promise.all(variants.map(async (variant, i) => {
    // The same entry twice (an A/A check) is two processes with two rows.
    const label = variants.indexOf(variant) === i ? variant : `${variant} #${variants.slice(0, i + 1).filter((v) => v === variant).length}`
    const other = await startVariant(`service (${label})`, variant, upstream, issuer)
    return { other, target: cancelTarget(`service, memory, ${label}`, other.url, await signIn(other, issuer, EMAIL), other.pid) }
  }))
  const targets = [
    cancelTarget('proxy', proxy.url, 'unused', proxy.pid),
    cancelTarget('fastify forwarder', plain.url, 'unused', plain.pid),
    cancelTarget('service, memory', service.url, await signIn(service, issuer, EMAIL), service.pid),
    ...others.map(({ target }) => target)
  ]
  const rounds = QUICK ? 1 : Number(process.env.BENCH_ROUNDS ?? 3)
  const runs = new Map<string, LoadResult[]>(targets.map((t) => [t.name, []]))
  for (let round = 0; round < rounds; round++) {
    for (let i = 0; i < targets.length; i++) {
      const target = targets[(i + round) % targets.length] as Target
      const result = await measure(target, { seconds: QUICK ? 1 : Number(process.env.BENCH_SECONDS ?? 4), connections: MAX_CONNECTIONS })
      expectOnly(target.name, result, ['200'])
      runs.get(target.name)?.push(result)
      process.stderr.write(`round ${round + 1}: ${target.name} ${fmt(result.rps, 0)} req/s, ${fmt(result.cpuUsPerRequest ?? NaN, 1)} µs/req\n`)
    }
  }
  const proxyRuns = runs.get('proxy') ?? []
  const serviceRuns = runs.get('service, memory') ?? []
  // CPU ÷ the service's in the same round: the A/B figure for BENCH_VARIANTS, paired by round so
  // that the machine's drift between rounds cancels out.
  console.log('\n| contender | req/s | × proxy | CPU µs/req | CPU ÷ service | peak RSS MiB |\n| --- | ---: | ---: | ---: | ---: | ---: |')
  for (const target of targets) {
    const mine = runs.get(target.name) ?? []
    const ratio = median(mine.map((r, i) => r.rps / (proxyRuns[i]?.rps ?? NaN)))
    const cpu = median(mine.map((r, i) => (r.cpuUsPerRequest ?? NaN) / (serviceRuns[i]?.cpuUsPerRequest ?? NaN)))
    console.log(`| ${target.name} | ${fmt(median(mine.map((r) => r.rps)), 0)} | ${fmt(ratio)} | ${fmt(median(mine.map((r) => r.cpuUsPerRequest ?? NaN)), 1)} | ${fmt(cpu)} | ${fmt(mib(memoryKiB(target.pid as number, 'VmHWM')), 1)} |`)
  }
  console.log(`\nservice, memory: ${await heapSummary(service)}`)
  for (const { other } of others) console.log(`${other.name}: ${await heapSummary(other)}`)
  await Promise.all([stop(service), ...others.map(async ({ other }) => await stop(other)), stop(plain), stop(proxy), stop(upstream), issuer.close()])
}

/**
 * `--instructions`: user-space instructions per cancel, counted by valgrind's callgrind, for the
 * minimal proxy, the service (dist/server.js) and each of BENCH_VARIANTS. It leaves out the kernel
 * (socket writes), so it says what our code costs, not what a request costs. For the proxy the
 * count repeats to 0.1% whatever else the machine does; for the service it does not (6% between
 * two runs of one build), because its timers and V8's GC heuristics run by wall time, which
 * valgrind stretches. Each contender runs alone: BENCH_WARM cancels (default 3000) for the JIT to
 * settle, counters zeroed, BENCH_COUNT cancels (default 2000) counted, over 4 connections. About
 * five minutes per contender.
 */
async function instructions (): Promise<void> {
  if (spawnSync('valgrind', ['--version']).status !== 0) throw new Error('--instructions needs valgrind')
  const dir = mkdtempSync(join(tmpdir(), 'bff-callgrind-'))
  // callgrind_control reaches the process through vgdb, whose pipes are named after $USER and
  // $HOST: callgrind_control runs with the measured processes' (no USER; the service's HOST).
  const vgdbPrefix = `--vgdb-prefix=${join(dir, 'vgdb')}`
  const control = (command: string, proc: Proc): void => {
    const result = spawnSync('callgrind_control', [vgdbPrefix, command, String(proc.pid)], {
      encoding: 'utf8', env: { PATH: process.env.PATH ?? '', ...(proc.name === 'proxy' ? {} : { HOST: '127.0.0.1' }) }
    })
    if (result.status !== 0 || /error|failed/i.test(result.stderr)) throw new Error(`${proc.name}: callgrind_control ${command} failed: ${result.stdout} ${result.stderr}`)
  }
  let started = 0
  measuredWrapper = (name) => ['valgrind', '--tool=callgrind', '--smc-check=all', vgdbPrefix, `--callgrind-out-file=${join(dir, `${started++}-${name.replace(/\W+/g, '_')}`)}.out`]
  const warm = Number(process.env.BENCH_WARM ?? 3000)
  const counted = Number(process.env.BENCH_COUNT ?? 2000)
  const issuer = await startIssuer({ teardown: () => {} })
  const upstream = await launchListening('upstream', LOAD_CORE, 'bench/upstream.mjs', { CV_API_KEY: API_KEY, APPOINTMENT_ID })
  const variants = ['dist/server.js', ...benchVariants()]
  const contenders: Array<() => Promise<{ proc: Proc, target: Target }>> = [
    async () => {
      const proc = await launchListening('proxy', SERVICE_CORE, 'bench/proxy.mjs', { CV_API_KEY: API_KEY, UPSTREAM_URL: upstream.url, PATIENT_EMAIL: EMAIL })
      return { proc, target: cancelTarget('proxy', proc.url, 'unused', proc.pid) }
    },
    ...variants.map((variant) => async () => {
      const proc = await startVariant(`service ${variant}`, variant, upstream, issuer)
      return { proc, target: cancelTarget(`service ${variant}`, proc.url, await signIn(proc, issuer, EMAIL), proc.pid) }
    })
  ]
  const rows: Array<[string, number]> = []
  for (const start of contenders) {
    const { proc, target } = await start()
    expectOnly(`${target.name} (warm-up)`, await run(target, { seconds: 0, connections: 4, amount: warm }), ['200'])
    control('--zero', proc)
    expectOnly(target.name, await run(target, { seconds: 0, connections: 4, amount: counted }), ['200'])
    const before = new Set(readdirSync(dir))
    control('--dump', proc)
    let dump: string | undefined
    for (let waited = 0; dump === undefined && waited < 60_000; waited += 500) {
      dump = readdirSync(dir).find((file) => !before.has(file) && /\.out\.\d+$/.test(file))
      if (dump === undefined) await sleep(500)
    }
    if (dump === undefined) throw new Error(`${target.name}: callgrind wrote no dump`)
    await sleep(1000) // the dump is written whole before the next command is read
    const total = /^(?:totals|summary): (\d+)/m.exec(readFileSync(join(dir, dump), 'utf8'))
    if (total === null) throw new Error(`${target.name}: no totals in ${dump}`)
    rows.push([target.name, Number(total[1]) / counted])
    process.stderr.write(`${target.name}: ${fmt(Number(total[1]) / counted / 1000, 1)} k instructions per cancel\n`)
    await stop(proc)
  }
  await Promise.all([stop(upstream), issuer.close()])
  const proxy = rows[0]?.[1] ?? NaN
  const service = rows[1]?.[1] ?? NaN
  console.log('\n| contender | k instructions per cancel (user space) | × proxy | ÷ service |\n| --- | ---: | ---: | ---: |')
  for (const [name, perCancel] of rows) console.log(`| ${name} | ${fmt(perCancel / 1000, 1)} | ${fmt(perCancel / proxy)} | ${fmt(perCancel / service)} |`)
}

/** Where a service's resident memory is, from its own metrics: V8's heap spaces and the rest. */
async function heapSummary (service: Service): Promise<string> {
  const text = await (await fetch(service.metricsUrl)).text()
  const value = (pattern: RegExp): number => Number(pattern.exec(text)?.[1] ?? NaN)
  const spaces = [...text.matchAll(/^nodejs_heap_space_size_total_bytes\{space="(\w+)"\} (\d+)/gm)]
    .map(([, space, bytes]) => `${space} ${fmt(mib(Number(bytes) / 1024), 1)}`).join(', ')
  return `RSS ${fmt(mib(value(/^process_resident_memory_bytes (\d+)/m) / 1024), 1)} MiB; V8 heap total ${fmt(mib(value(/^nodejs_heap_size_total_bytes (\d+)/m) / 1024), 1)} MiB (${spaces}), used ${fmt(mib(value(/^nodejs_heap_size_used_bytes (\d+)/m) / 1024), 1)} MiB; external ${fmt(mib(value(/^nodejs_external_memory_bytes (\d+)/m) / 1024), 1)} MiB`
}

interface ProfileNode { id: number, callFrame: { functionName: string, url: string, lineNumber: number }, children?: number[] }
interface CpuProfile { nodes: ProfileNode[], samples: number[], timeDeltas: number[] }

/**
 * `--profile`: the memory-store service under a closed-loop cancel load with --cpu-prof, then the
 * self time by package/file and the hottest functions.
 */
async function profile (): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'bff-cpu-prof-'))
  const issuer = await startIssuer({ teardown: () => {} })
  const upstream = await launchListening('upstream', LOAD_CORE, 'bench/upstream.mjs', { CV_API_KEY: API_KEY, APPOINTMENT_ID })
  const ownership = process.env.OWNERSHIP_CHECK ?? 'off'
  const service = await startService('service (profiled)', {
    ...serviceEnv(upstream, issuer),
    OWNERSHIP_CHECK: ownership,
    ...(SHED_PROFILE ? { RATE_LIMIT_IP: `${SHED.ipLimit}/1s`, TRUST_PROXY: '127.0.0.1' } : {}),
    ...extraServiceEnv()
  // From the sources through tsx, where each frame keeps its package; BENCH_PROFILE_BUNDLE=1
  // profiles the production bundle instead (what runs, without tsx's loader in the profile).
  }, undefined, [...(BUNDLE_PROFILE ? [] : ['--import', 'tsx']), '--cpu-prof', `--cpu-prof-dir=${dir}`],
  BUNDLE_PROFILE ? 'dist/server.js' : 'src/server.ts')
  const target = cancelTarget('profiled', service.url, await signIn(service, issuer, EMAIL), service.pid, SHED_PROFILE ? '10.2.0.1' : undefined)
  const result = await measure(target, { seconds: QUICK ? 2 : 10, connections: SHED_PROFILE ? SHED.floodConnections : MAX_CONNECTIONS })
  expectOnly('profiled', result, SHED_PROFILE ? ['200', '429'] : ['200'])
  await stop(service)
  await Promise.all([stop(upstream), issuer.close()])
  const file = readdirSync(dir).find((name) => name.endsWith('.0.001.cpuprofile')) ?? readdirSync(dir).find((name) => name.endsWith('.cpuprofile'))
  if (file === undefined) throw new Error(`no profile written in ${dir}`)
  const prof = JSON.parse(readFileSync(join(dir, file), 'utf8')) as CpuProfile
  const self = new Map<number, number>()
  prof.samples.forEach((id, i) => self.set(id, (self.get(id) ?? 0) + (prof.timeDeltas[i] ?? 0)))
  const total = [...self.values()].reduce((a, b) => a + b, 0)
  const byPlace = new Map<string, number>()
  const byFunction = new Map<string, number>()
  for (const node of prof.nodes) {
    const us = self.get(node.id) ?? 0
    if (us === 0) continue
    const url = node.callFrame.url.replace(`file://${ROOT}/`, '')
    const place = placeOf(url, node.callFrame.functionName)
    byPlace.set(place, (byPlace.get(place) ?? 0) + us)
    const fn = `${node.callFrame.functionName || '(anonymous)'} ${url === '' ? '' : `${url}:${node.callFrame.lineNumber + 1}`}`
    byFunction.set(fn, (byFunction.get(fn) ?? 0) + us)
  }
  const top = (map: Map<string, number>, n: number): string => [...map].sort((a, b) => b[1] - a[1]).slice(0, n)
    .map(([name, us]) => `| ${fmt(100 * us / total, 1)}% | ${name} |`).join('\n')
  console.log(`\n## CPU profile: service (${SHED_PROFILE ? 'a flood from one address over RATE_LIMIT_IP, ' : ''}OWNERSHIP_CHECK=${ownership}, BENCH_SERVICE_ENV=${process.env.BENCH_SERVICE_ENV ?? '{}'}), ${result.responses} cancels at ${fmt(result.rps, 0)} req/s; profile ${join(dir, file)}\n`)
  console.log(`| self time | package or file |\n| ---: | --- |\n${top(byPlace, 20)}\n`)
  console.log(`| self time | function |\n| ---: | --- |\n${top(byFunction, 30)}\n`)
  // Each sample charged to the innermost frame of the service's own code on its stack: what a
  // hook or route costs with the libraries it calls.
  const parent = new Map<number, number>()
  for (const node of prof.nodes) for (const child of node.children ?? []) parent.set(child, node.id)
  const nodes = new Map(prof.nodes.map((node) => [node.id, node]))
  const byOwnFrame = new Map<string, number>()
  for (const [id, us] of self) {
    let name = '(no frame of src/ on the stack: HTTP parsing, sockets, timers, GC, idle)'
    for (let at: number | undefined = id; at !== undefined; at = parent.get(at)) {
      const frame = nodes.get(at)?.callFrame
      if (frame !== undefined && frame.url.includes(`${ROOT}/src/`)) {
        name = `${frame.functionName || '(anonymous)'} ${frame.url.replace(`file://${ROOT}/`, '')}:${frame.lineNumber + 1}`
        break
      }
    }
    byOwnFrame.set(name, (byOwnFrame.get(name) ?? 0) + us)
  }
  console.log(`| inclusive time | innermost frame of the service's own code |\n| ---: | --- |\n${top(byOwnFrame, 25)}`)
}

/** Where a profile node's code lives: a package, a file of ours, Node's core, or native. */
function placeOf (url: string, functionName: string): string {
  if (url === '') return `(${functionName || 'native'})`
  if (url.startsWith('node:')) return 'node: core'
  if (url.includes('node_modules/')) return url.replace(/^.*node_modules\/((@[^/]+\/)?[^/]+).*$/, '$1')
  return url
}

/** Least-squares slope of (x, y) samples. */
function fitSlope (points: Array<[number, number]>): number {
  const n = points.length
  if (n < 2) return NaN
  const mx = points.reduce((s, [x]) => s + x, 0) / n
  const my = points.reduce((s, [, y]) => s + y, 0) / n
  let num = 0
  let den = 0
  for (const [x, y] of points) { num += (x - mx) * (y - my); den += (x - mx) ** 2 }
  return den === 0 ? NaN : num / den
}

main().then(() => process.exit(), (error: unknown) => {
  console.error(error)
  process.exit(1)
})

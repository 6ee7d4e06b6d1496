import t, { type Test } from 'tap'
import { request } from 'node:http'
import { connect } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { buildTestApp, signIn } from '../helpers/app.js'
import { SANDBOX_KEY, startSandbox, type RunningSandbox } from '../helpers/sandbox.js'
import { startRedis, type RedisServer, redisClient } from '../helpers/redis.js'
import { listen, scanLogs, UNLIMITED } from '../fault/support.js'
import type { App } from '../../src/app.js'
import { inFlightTtlFor } from '../../src/idempotency/index.js'

/**
 * The audit trail as an auditor reads it (README, Operations, "Logs:"): every cancel request has
 * exactly one record, in its access line; its outcome, status and upstream status are what its
 * client was answered and what the upstream said to this request's own cancel; `earlier` says
 * whose answer it was. A trail counts the distinct appointment ids among the records whose outcome
 * is `cancelled` and `earlier` is `null` or `confirmed`: every appointment cancelled through the
 * service for which some client was answered 200 is counted, once, and nothing else is.
 */

interface Audit {
  event: string
  requestId: string
  patient: string
  appointmentId: string | null
  outcome: string
  status: number
  upstreamStatus: number | null
  earlier: string | null
}

const ALICE = 'alice@example.com'
const REASON = 'private audit reason'

interface Stack {
  apps: App[]
  sandbox: RunningSandbox
  /** Alice's session on each replica (one session per replica; with Redis each works on both). */
  tokens: string[]
  lines: string[]
  patient: string
  redis?: RedisServer
}

async function buildStack (t: Test, replicas: number, env: Record<string, string> = {}, redis?: RedisServer): Promise<Stack> {
  const sandbox = await startSandbox(t)
  const lines: string[] = []
  const logStream = { write (line: string) { lines.push(line) } }
  const apps: App[] = []
  const tokens: string[] = []
  for (let i = 0; i < replicas; i++) {
    const { app, issuer } = await buildTestApp(t, {
      upstreamUrl: sandbox.url,
      logStream,
      ...(redis === undefined ? {} : { redis }),
      // The upstream's deadline: 1 s, well past the 300 ms holds of holdLeaderThen on a loaded machine;
      // the timeouts below hold their call 2 s.
      env: { CV_API_KEY: SANDBOX_KEY, CV_TIMEOUT_MS: '1000', ...UNLIMITED, ...env }
    })
    apps.push(app)
    tokens.push(await signIn(app, issuer, ALICE))
  }
  return { apps, sandbox, tokens, lines, patient: apps[0]!.patientRef(ALICE), ...(redis === undefined ? {} : { redis }) }
}

interface CancelOptions { key?: string, reason?: string | null, app?: number, token?: string }

async function cancel (stack: Stack, requestId: string, id: string, options: CancelOptions = {}): Promise<{ status: number, body: { code?: string, message?: string } }> {
  const app = stack.apps[options.app ?? 0]!
  const reason = options.reason === undefined ? REASON : options.reason
  const response = await app.inject({
    method: 'POST',
    url: `/appointments/${id}/cancel`,
    headers: {
      authorization: `Bearer ${options.token ?? stack.tokens[options.app ?? 0]!}`,
      'x-request-id': requestId,
      ...(options.key === undefined ? {} : { 'idempotency-key': options.key })
    },
    ...(reason === null ? {} : { payload: { reason } })
  })
  return { status: response.statusCode, body: response.json() }
}

/** The audit records of the trail, by request id (every record a request has, to see doubles). */
function auditsOf (lines: readonly string[]): Map<string, Audit[]> {
  const byRequest = new Map<string, Audit[]>()
  for (const line of lines) {
    const audit = (JSON.parse(line) as { audit?: Audit }).audit
    if (audit === undefined) continue
    byRequest.set(audit.requestId, [...(byRequest.get(audit.requestId) ?? []), audit])
  }
  return byRequest
}

/** What the trail counts as cancelled, as README says to count it. */
function counted (lines: readonly string[]): string[] {
  const ids = new Set<string>()
  for (const records of auditsOf(lines).values()) {
    for (const audit of records) {
      if (audit.outcome === 'cancelled' && (audit.earlier === null || audit.earlier === 'confirmed') && audit.appointmentId !== null) ids.add(audit.appointmentId)
    }
  }
  return [...ids].sort()
}

type Expected = Pick<Audit, 'appointmentId' | 'outcome' | 'status' | 'upstreamStatus' | 'earlier'> & { patient?: null }

/** Exactly these records, one per request id, and no other audit record in the trail. */
async function trailIs (t: Test, stack: Stack, expected: Record<string, Expected>): Promise<void> {
  // The access lines of requests whose client left are written as they end: wait for them.
  for (let i = 0; i < 100 && auditsOf(stack.lines).size < Object.keys(expected).length; i++) await sleep(20)
  await sleep(50)
  const audits = auditsOf(stack.lines)
  const want = new Map(Object.entries(expected).map(([requestId, fields]) => [requestId, [{ event: 'appointment.cancel', requestId, patient: stack.patient, ...fields }]]))
  t.same(Object.fromEntries(audits), Object.fromEntries(want), 'the trail holds exactly one record per request, as expected')
  scanLogs(t, stack.lines, { reason: REASON, email: ALICE, tokens: stack.tokens })
}

function posts (sandbox: RunningSandbox): number {
  return sandbox.control.calls.filter((call) => call.method === 'POST').length
}

async function until (what: () => boolean, ms = 3000): Promise<void> {
  const end = Date.now() + ms
  while (!what() && Date.now() < end) await sleep(5)
}

t.test('own answers: 200, the upstream\'s 400, 401, 404, 5xx, 429, timeout and reset, each one record', async (t) => {
  const stack = await buildStack(t, 1)
  const control = stack.sandbox.control
  const ids = Array.from({ length: 9 }, () => control.seedAppointment(ALICE).id)
  t.equal((await cancel(stack, 'own-200', ids[0]!)).status, 200)
  control.setFailure({ kind: 'status', status: 400, endpoint: 'cancel', times: 1 })
  t.equal((await cancel(stack, 'own-400', ids[1]!)).status, 400)
  control.setFailure({ kind: 'status', status: 401, endpoint: 'cancel', times: 1 })
  t.equal((await cancel(stack, 'own-401', ids[2]!)).status, 502)
  t.equal((await cancel(stack, 'own-404', '00000000-0000-4000-8000-000000000000')).status, 404)
  control.setFailure({ kind: 'status', status: 503, endpoint: 'cancel', times: 1 })
  t.equal((await cancel(stack, 'own-503', ids[3]!)).status, 502)
  control.setFailure({ kind: 'slow', delayMs: 2000, endpoint: 'cancel', times: 1 })
  t.equal((await cancel(stack, 'own-timeout', ids[4]!)).status, 504)
  control.setFailure({ kind: 'reset', endpoint: 'cancel', times: 1 })
  t.equal((await cancel(stack, 'own-reset', ids[5]!)).status, 502)
  control.setFailure({ kind: 'reset-after-apply', endpoint: 'cancel', times: 1 })
  t.equal((await cancel(stack, 'own-reset-applied', ids[6]!)).status, 502)
  t.equal((await cancel(stack, 'own-reset-applied-retry', ids[6]!)).status, 404, 'its key-less retry finds the appointment gone')
  control.setFailure({ kind: 'rate-limited', endpoint: 'cancel', times: 1 })
  t.equal((await cancel(stack, 'own-429', ids[7]!)).status, 429)
  t.equal((await cancel(stack, 'cooldown-429', ids[8]!)).status, 429, 'the cooldown refuses the next one')
  await trailIs(t, stack, {
    'own-200': { appointmentId: ids[0]!, outcome: 'cancelled', status: 200, upstreamStatus: 200, earlier: null },
    'own-400': { appointmentId: ids[1]!, outcome: 'UPSTREAM_REJECTED', status: 400, upstreamStatus: 400, earlier: null },
    'own-401': { appointmentId: ids[2]!, outcome: 'UPSTREAM_AUTH_FAILED', status: 502, upstreamStatus: 401, earlier: null },
    'own-404': { appointmentId: '00000000-0000-4000-8000-000000000000', outcome: 'APPOINTMENT_NOT_FOUND', status: 404, upstreamStatus: null, earlier: null },
    'own-503': { appointmentId: ids[3]!, outcome: 'UPSTREAM_ERROR', status: 502, upstreamStatus: 503, earlier: null },
    'own-timeout': { appointmentId: ids[4]!, outcome: 'UPSTREAM_TIMEOUT', status: 504, upstreamStatus: null, earlier: null },
    'own-reset': { appointmentId: ids[5]!, outcome: 'UPSTREAM_ERROR', status: 502, upstreamStatus: null, earlier: null },
    'own-reset-applied': { appointmentId: ids[6]!, outcome: 'UPSTREAM_ERROR', status: 502, upstreamStatus: null, earlier: null },
    'own-reset-applied-retry': { appointmentId: ids[6]!, outcome: 'APPOINTMENT_NOT_FOUND', status: 404, upstreamStatus: null, earlier: null },
    'own-429': { appointmentId: ids[7]!, outcome: 'UPSTREAM_RATE_LIMITED', status: 429, upstreamStatus: 429, earlier: null },
    'cooldown-429': { appointmentId: ids[8]!, outcome: 'UPSTREAM_RATE_LIMITED', status: 429, upstreamStatus: null, earlier: null }
  })
  t.same(counted(stack.lines), [ids[0]!], 'only the 200 is counted (the applied reset cancelled too, but no client was answered 200)')
})

t.test('keyed: replay, 409 in flight, 422 mismatch, an unknown outcome confirmed', async (t) => {
  const stack = await buildStack(t, 1)
  const control = stack.sandbox.control
  const first = control.seedAppointment(ALICE).id
  const second = control.seedAppointment(ALICE).id
  t.equal((await cancel(stack, 'k-first', first, { key: 'audit-key-1' })).status, 200)
  t.equal((await cancel(stack, 'k-replay', first, { key: 'audit-key-1' })).status, 200)
  t.equal((await cancel(stack, 'k-mismatch', second, { key: 'audit-key-1' })).status, 422)
  control.setFailure({ kind: 'slow-after-apply', delayMs: 2000, endpoint: 'cancel', times: 1 })
  const leading = cancel(stack, 'k-timeout', second, { key: 'audit-key-2' })
  await until(() => posts(stack.sandbox) === 2)
  t.equal((await cancel(stack, 'k-in-flight', second, { key: 'audit-key-2' })).status, 409)
  t.equal((await leading).status, 504)
  const confirmed = await cancel(stack, 'k-confirmed', second, { key: 'audit-key-2' })
  t.equal(confirmed.status, 200)
  t.equal((await cancel(stack, 'k-replay-confirmed', second, { key: 'audit-key-2' })).status, 200)
  await trailIs(t, stack, {
    'k-first': { appointmentId: first, outcome: 'cancelled', status: 200, upstreamStatus: 200, earlier: null },
    'k-replay': { appointmentId: first, outcome: 'cancelled', status: 200, upstreamStatus: null, earlier: 'replayed' },
    'k-mismatch': { appointmentId: second, outcome: 'IDEMPOTENCY_MISMATCH', status: 422, upstreamStatus: null, earlier: null },
    'k-in-flight': { appointmentId: second, outcome: 'IDEMPOTENCY_IN_FLIGHT', status: 409, upstreamStatus: null, earlier: null },
    'k-timeout': { appointmentId: second, outcome: 'UPSTREAM_TIMEOUT', status: 504, upstreamStatus: null, earlier: null },
    'k-confirmed': { appointmentId: second, outcome: 'cancelled', status: 200, upstreamStatus: null, earlier: 'confirmed' },
    'k-replay-confirmed': { appointmentId: second, outcome: 'cancelled', status: 200, upstreamStatus: null, earlier: 'replayed' }
  })
  t.same(counted(stack.lines), [first, second].sort())
})

t.test('refusals before the cancel: org budget, per-session limit, no session', async (t) => {
  const stack = await buildStack(t, 1, { RATE_LIMIT_CANCEL: '2/1m', CV_RATE_LIMIT: '2/60s' })
  const ids = Array.from({ length: 3 }, () => stack.sandbox.control.seedAppointment(ALICE).id)
  t.equal((await cancel(stack, 'r-200', ids[0]!, { key: 'r-key' })).status, 200)
  // Both upstream calls spent (list, cancel); the next cancel finds its appointment in the cached list.
  t.equal((await cancel(stack, 'r-budget', ids[1]!, { key: 'r-key-2' })).status, 429)
  t.equal((await cancel(stack, 'r-session', ids[2]!)).status, 429)
  t.equal((await cancel(stack, 'r-no-session', ids[2]!, { token: 'not-a-session' })).status, 401)
  t.equal((await cancel(stack, 'r-bad-key', ids[2]!, { key: 'a key with spaces' })).status, 429, 'the session limit comes first')
  await trailIs(t, stack, {
    'r-200': { appointmentId: ids[0]!, outcome: 'cancelled', status: 200, upstreamStatus: 200, earlier: null },
    'r-budget': { appointmentId: ids[1]!, outcome: 'UPSTREAM_RATE_LIMITED', status: 429, upstreamStatus: null, earlier: null },
    'r-session': { appointmentId: ids[2]!, outcome: 'RATE_LIMITED', status: 429, upstreamStatus: null, earlier: null },
    'r-no-session': { patient: null, appointmentId: ids[2]!, outcome: 'SESSION_REQUIRED', status: 401, upstreamStatus: null, earlier: null },
    'r-bad-key': { appointmentId: ids[2]!, outcome: 'RATE_LIMITED', status: 429, upstreamStatus: null, earlier: null }
  })
})
function lists (sandbox: RunningSandbox): number {
  return sandbox.control.calls.filter((call) => call.method === 'GET').length
}

/** The leader's ownership list call is held upstream for `ms`; then `failure` awaits its cancel. */
async function holdLeaderThen<T> (stack: Stack, start: () => Promise<T>, failure: Parameters<RunningSandbox['control']['setFailure']>[0] | null, ms = 300): Promise<{ leader: Promise<T> }> {
  const before = lists(stack.sandbox)
  stack.sandbox.control.setFailure({ kind: 'slow', delayMs: ms, endpoint: 'list', times: 1 })
  const leader = start()
  await until(() => lists(stack.sandbox) > before)
  if (failure === null) stack.sandbox.control.clearFailure()
  else stack.sandbox.control.setFailure(failure)
  // Wrapped: an async function returning the promise itself would wait for it.
  return { leader }
}

t.test('key-less single flight in one process: followers of a leader\'s 200 and of its failure are each "shared"', async (t) => {
  const stack = await buildStack(t, 1)
  const ok = stack.sandbox.control.seedAppointment(ALICE).id
  const { leader } = await holdLeaderThen(stack, async () => await cancel(stack, 'sf-leader', ok), null)
  const followers = await Promise.all([cancel(stack, 'sf-follower-1', ok), cancel(stack, 'sf-follower-2', ok)])
  t.same([(await leader).status, ...followers.map((answer) => answer.status)], [200, 200, 200])
  t.equal((await cancel(stack, 'sf-late-tap', ok)).status, 200, 'a double tap just after the answer gets it')
  // Not in the cached list: its leader looks the list up afresh, and is held there.
  const failing = stack.sandbox.control.seedAppointment(ALICE).id
  const failed = await holdLeaderThen(stack, async () => await cancel(stack, 'sf-failed-leader', failing), { kind: 'status', status: 503, endpoint: 'cancel', times: 1 })
  const failedFollower = await cancel(stack, 'sf-failed-follower', failing)
  t.same([(await failed.leader).status, failedFollower.status], [502, 502])
  t.equal(posts(stack.sandbox), 2, 'one upstream cancel per leader')
  await trailIs(t, stack, {
    'sf-leader': { appointmentId: ok, outcome: 'cancelled', status: 200, upstreamStatus: 200, earlier: null },
    'sf-follower-1': { appointmentId: ok, outcome: 'cancelled', status: 200, upstreamStatus: null, earlier: 'shared' },
    'sf-follower-2': { appointmentId: ok, outcome: 'cancelled', status: 200, upstreamStatus: null, earlier: 'shared' },
    'sf-late-tap': { appointmentId: ok, outcome: 'cancelled', status: 200, upstreamStatus: null, earlier: 'shared' },
    'sf-failed-leader': { appointmentId: failing, outcome: 'UPSTREAM_ERROR', status: 502, upstreamStatus: 503, earlier: null },
    'sf-failed-follower': { appointmentId: failing, outcome: 'UPSTREAM_ERROR', status: 502, upstreamStatus: null, earlier: 'shared' }
  })
  t.same(counted(stack.lines), [ok])
  // One upstream failure, one warning: the leader's. Its followers' access lines say they shared it.
  const warnings = stack.lines.map((line) => JSON.parse(line) as { level: number, reqId?: string }).filter((line) => line.level === 40)
  t.same(warnings.map((line) => line.reqId), ['sf-failed-leader'], 'the shared failure is warned of once')
})

t.test('key-less single flight across two replicas: the leader\'s failure is "shared" by its followers on both', async (t) => {
  const stack = await buildStack(t, 2, {}, await startRedis(t))
  const id = stack.sandbox.control.seedAppointment(ALICE).id
  const { leader } = await holdLeaderThen(stack, async () => await cancel(stack, 'x-leader', id), { kind: 'reset', endpoint: 'cancel', times: 1 })
  const followers = await Promise.all([cancel(stack, 'x-follower-here', id), cancel(stack, 'x-follower-there', id, { app: 1 })])
  t.same([(await leader).status, ...followers.map((answer) => answer.status)], [502, 502, 502])
  t.equal(posts(stack.sandbox), 1, 'one upstream cancel')
  await trailIs(t, stack, {
    'x-leader': { appointmentId: id, outcome: 'UPSTREAM_ERROR', status: 502, upstreamStatus: null, earlier: null },
    'x-follower-here': { appointmentId: id, outcome: 'UPSTREAM_ERROR', status: 502, upstreamStatus: null, earlier: 'shared' },
    'x-follower-there': { appointmentId: id, outcome: 'UPSTREAM_ERROR', status: 502, upstreamStatus: null, earlier: 'shared' }
  })
})
t.test('an appointment cancelled by its agentEventId and by its id is one appointment in the trail', async (t) => {
  const stack = await buildStack(t, 1)
  const appointment = stack.sandbox.control.seedAppointment(ALICE)
  // The keyed cancel names the appointment by its agentEventId; its answer is lost, the cancel not applied.
  stack.sandbox.control.setFailure({ kind: 'reset', endpoint: 'cancel', times: 1 })
  t.equal((await cancel(stack, 'ae-unknown', appointment.agentEventId, { key: 'ae-key' })).status, 502)
  // Another cancel names it by its id, and cancels it.
  t.equal((await cancel(stack, 'ae-by-id', appointment.id, { reason: null })).status, 200)
  // The keyed retry finds it no longer listed: confirmed.
  t.equal((await cancel(stack, 'ae-confirmed', appointment.agentEventId, { key: 'ae-key' })).status, 200)
  t.equal(posts(stack.sandbox), 2)
  await until(() => auditsOf(stack.lines).size === 3)
  t.same(counted(stack.lines), [appointment.id], 'counted once, under the appointment\'s id')
})

/** The pid of a throwaway redis-server (its own INFO), to pause it as a stalled server would be. */
async function redisPid (server: RedisServer): Promise<number> {
  const client = redisClient({ port: server.port, host: '127.0.0.1', maxRetriesPerRequest: 0 })
  try {
    return Number(/process_id:(\d+)/.exec(await client.info('server'))?.[1])
  } finally {
    client.disconnect()
  }
}

t.test('Redis down (killed, then stalled by SIGSTOP): keyed and key-less cancels are refused 503 at the session, audited without a patient', async (t) => {
  const redis = await startRedis(t)
  const stack = await buildStack(t, 1, {}, redis)
  const ids = Array.from({ length: 4 }, () => stack.sandbox.control.seedAppointment(ALICE).id)
  await redis.stop()
  const killed = [await cancel(stack, 'down-keyed', ids[0]!, { key: 'down-key' }), await cancel(stack, 'down-keyless', ids[1]!)]
  t.same(killed.map((answer) => answer.status), [503, 503], 'killed')
  await redis.start()
  await until(() => stack.apps[0]!.sharedState.mode() === 'redis', 5000)
  const pid = await redisPid(redis)
  process.kill(pid, 'SIGSTOP')
  let stalled
  try {
    stalled = [await cancel(stack, 'stalled-keyed', ids[2]!, { key: 'stalled-key' }), await cancel(stack, 'stalled-keyless', ids[3]!)]
  } finally {
    process.kill(pid, 'SIGCONT')
  }
  t.same(stalled.map((answer) => [answer.status, answer.body.code]), [[503, 'SERVICE_UNAVAILABLE'], [503, 'SERVICE_UNAVAILABLE']], 'stalled')
  t.equal(posts(stack.sandbox), 0)
  await trailIs(t, stack, {
    'down-keyed': { patient: null, appointmentId: ids[0]!, outcome: 'SERVICE_UNAVAILABLE', status: 503, upstreamStatus: null, earlier: null },
    'down-keyless': { patient: null, appointmentId: ids[1]!, outcome: 'SERVICE_UNAVAILABLE', status: 503, upstreamStatus: null, earlier: null },
    'stalled-keyed': { patient: null, appointmentId: ids[2]!, outcome: 'SERVICE_UNAVAILABLE', status: 503, upstreamStatus: null, earlier: null },
    'stalled-keyless': { patient: null, appointmentId: ids[3]!, outcome: 'SERVICE_UNAVAILABLE', status: 503, upstreamStatus: null, earlier: null }
  })
})

t.test('the idempotency store failing its commands while sessions still answer: keyed 503, key-less runs on without it', async (t) => {
  const redis = await startRedis(t)
  const stack = await buildStack(t, 1, {}, redis)
  const ids = Array.from({ length: 2 }, () => stack.sandbox.control.seedAppointment(ALICE).id)
  const admin = redisClient({ port: redis.port, host: '127.0.0.1', maxRetriesPerRequest: 0 })
  t.teardown(() => { admin.disconnect() })
  // Every key but the idempotency records' (`idem:`) stays allowed: their scripts are refused (NOPERM).
  await admin.call('ACL', 'SETUSER', 'default', 'resetkeys', '~[^i]*', '~i[^d]*')
  const answers = [await cancel(stack, 'noperm-keyed', ids[0]!, { key: 'noperm-key' }), await cancel(stack, 'noperm-keyless', ids[1]!)]
  await admin.call('ACL', 'SETUSER', 'default', 'allkeys')
  t.same(answers.map((answer) => [answer.status, answer.body.code]), [[503, 'SERVICE_UNAVAILABLE'], [200, undefined]])
  await trailIs(t, stack, {
    'noperm-keyed': { appointmentId: ids[0]!, outcome: 'SERVICE_UNAVAILABLE', status: 503, upstreamStatus: null, earlier: null },
    'noperm-keyless': { appointmentId: ids[1]!, outcome: 'cancelled', status: 200, upstreamStatus: 200, earlier: null }
  })
  t.same(counted(stack.lines), [ids[1]!])
})

t.test('two replicas: a follower whose leader\'s replica died leads itself; a leader\'s 429 is shared by its follower', async (t) => {
  const stack = await buildStack(t, 2, {}, await startRedis(t))
  const control = stack.sandbox.control
  const orphan = control.seedAppointment(ALICE).id
  // Replica A leads, its cancel held upstream past the deadline, and loses Redis (it dies, as far
  // as the other replica can tell): its record is never completed.
  control.setFailure({ kind: 'slow', delayMs: 2000, endpoint: 'cancel', times: 1 })
  const dying = cancel(stack, 'dead-leader', orphan)
  await until(() => posts(stack.sandbox) === 1)
  stack.apps[0]!.sharedState.redis!.disconnect()
  const waiting = cancel(stack, 'orphan-follower', orphan, { app: 1 })
  t.equal((await dying).status, 504)
  const began = Date.now()
  t.equal((await waiting).status, 200, 'the follower waited out the marker, then led')
  t.ok(Date.now() - began < inFlightTtlFor(1000), 'within one in-flight lifetime')
  t.equal(posts(stack.sandbox), 2)

  // Replica B leads now (A has no Redis); the upstream answers its cancel 429.
  const limited = control.seedAppointment(ALICE).id
  const { leader } = await holdLeaderThen(stack, async () => await cancel(stack, 'limited-leader', limited, { app: 1 }), { kind: 'rate-limited', endpoint: 'cancel', times: 1 })
  const followers = await Promise.all([cancel(stack, 'limited-here', limited, { app: 1 })])
  t.same([(await leader).status, ...followers.map((answer) => answer.status)], [429, 429])
  t.equal(posts(stack.sandbox), 3)
  await trailIs(t, stack, {
    'dead-leader': { appointmentId: orphan, outcome: 'UPSTREAM_TIMEOUT', status: 504, upstreamStatus: null, earlier: null },
    'orphan-follower': { appointmentId: orphan, outcome: 'cancelled', status: 200, upstreamStatus: 200, earlier: null },
    'limited-leader': { appointmentId: limited, outcome: 'UPSTREAM_RATE_LIMITED', status: 429, upstreamStatus: 429, earlier: null },
    'limited-here': { appointmentId: limited, outcome: 'UPSTREAM_RATE_LIMITED', status: 429, upstreamStatus: null, earlier: 'shared' }
  })
  t.same(counted(stack.lines), [orphan])
})

t.test('clients that leave mid-cancel (real sockets): each request still has its one record', async (t) => {
  const stack = await buildStack(t, 1)
  const origin = await listen(stack.apps[0]!)
  const keyed = stack.sandbox.control.seedAppointment(ALICE).id
  const keyless = stack.sandbox.control.seedAppointment(ALICE).id
  /** Sends a cancel and leaves once `leaveWhen` holds: before its answer. */
  async function leaving (requestId: string, id: string, key: string | null): Promise<void> {
    const body = JSON.stringify({ reason: REASON })
    const sent = request(`${origin}/appointments/${id}/cancel`, {
      method: 'POST',
      agent: false,
      headers: {
        authorization: `Bearer ${stack.tokens[0]!}`,
        'content-type': 'application/json',
        'content-length': String(Buffer.byteLength(body)),
        'x-request-id': requestId,
        ...(key === null ? {} : { 'idempotency-key': key })
      }
    })
    sent.on('error', () => {})
    sent.end(body)
    const before = posts(stack.sandbox)
    await until(() => posts(stack.sandbox) > before)
    sent.destroy()
  }
  // A keyed cancel whose client leaves while it is upstream; the app's retry is replayed its 200.
  stack.sandbox.control.setFailure({ kind: 'slow-after-apply', delayMs: 200, endpoint: 'cancel', times: 1 })
  await leaving('left-keyed', keyed, 'left-key')
  await until(() => auditsOf(stack.lines).has('left-keyed'))
  t.equal((await cancel(stack, 'left-keyed-retry', keyed, { key: 'left-key' })).status, 200)
  // A key-less leader whose client leaves, and its double tap, which stays.
  stack.sandbox.control.setFailure({ kind: 'slow-after-apply', delayMs: 200, endpoint: 'cancel', times: 1 })
  const tap = leaving('left-leader', keyless, null).then(async () => await cancel(stack, 'stayed-follower', keyless))
  t.equal((await tap).status, 200)
  t.equal(posts(stack.sandbox), 2)
  await trailIs(t, stack, {
    'left-keyed': { appointmentId: keyed, outcome: 'cancelled', status: 200, upstreamStatus: 200, earlier: null },
    'left-keyed-retry': { appointmentId: keyed, outcome: 'cancelled', status: 200, upstreamStatus: null, earlier: 'replayed' },
    'left-leader': { appointmentId: keyless, outcome: 'cancelled', status: 200, upstreamStatus: 200, earlier: null },
    'stayed-follower': { appointmentId: keyless, outcome: 'cancelled', status: 200, upstreamStatus: null, earlier: 'shared' }
  })
  t.same(counted(stack.lines), [keyed, keyless].sort())
})

t.test('LOG_LEVEL=error keeps every audit record (own, shared, replayed, confirmed) and drops the other access lines', async (t) => {
  const stack = await buildStack(t, 1, { LOG_LEVEL: 'error' })
  const control = stack.sandbox.control
  const shared = control.seedAppointment(ALICE).id
  const keyed = control.seedAppointment(ALICE).id
  const { leader } = await holdLeaderThen(stack, async () => await cancel(stack, 'quiet-leader', shared), null)
  t.equal((await cancel(stack, 'quiet-follower', shared)).status, 200)
  t.equal((await leader).status, 200)
  control.setFailure({ kind: 'reset-after-apply', endpoint: 'cancel', times: 1 })
  t.equal((await cancel(stack, 'quiet-unknown', keyed, { key: 'quiet-key' })).status, 502)
  t.equal((await cancel(stack, 'quiet-confirmed', keyed, { key: 'quiet-key' })).status, 200)
  t.equal((await cancel(stack, 'quiet-replayed', keyed, { key: 'quiet-key' })).status, 200)
  await stack.apps[0]!.inject({ method: 'GET', url: '/appointments', headers: { authorization: `Bearer ${stack.tokens[0]!}` } })
  await trailIs(t, stack, {
    'quiet-leader': { appointmentId: shared, outcome: 'cancelled', status: 200, upstreamStatus: 200, earlier: null },
    'quiet-follower': { appointmentId: shared, outcome: 'cancelled', status: 200, upstreamStatus: null, earlier: 'shared' },
    'quiet-unknown': { appointmentId: keyed, outcome: 'UPSTREAM_ERROR', status: 502, upstreamStatus: null, earlier: null },
    'quiet-confirmed': { appointmentId: keyed, outcome: 'cancelled', status: 200, upstreamStatus: null, earlier: 'confirmed' },
    'quiet-replayed': { appointmentId: keyed, outcome: 'cancelled', status: 200, upstreamStatus: null, earlier: 'replayed' }
  })
  const completed = stack.lines.map((line) => JSON.parse(line) as { msg?: string, audit?: unknown }).filter((line) => line.msg === 'request completed')
  t.equal(completed.length, 5, 'no access line without an audit record (the sign-in, the list)')
  t.same(counted(stack.lines), [keyed, shared].sort())
})

t.test('a shutdown (close) while a leader and its follower wait upstream: both records are written before close ends', async (t) => {
  const stack = await buildStack(t, 1)
  const id = stack.sandbox.control.seedAppointment(ALICE).id
  const { leader } = await holdLeaderThen(stack, async () => await cancel(stack, 'closing-leader', id), null)
  const follower = cancel(stack, 'closing-follower', id)
  await sleep(20)
  await stack.apps[0]!.close()
  t.same([(await leader).status, (await follower).status], [200, 200])
  t.same([...auditsOf(stack.lines).keys()].sort(), ['closing-follower', 'closing-leader'], 'written before close() returned')
  await trailIs(t, stack, {
    'closing-leader': { appointmentId: id, outcome: 'cancelled', status: 200, upstreamStatus: 200, earlier: null },
    'closing-follower': { appointmentId: id, outcome: 'cancelled', status: 200, upstreamStatus: null, earlier: 'shared' }
  })
})

t.test('a cancel whose body is too slow to arrive: its one access line and its record have the 408 its client was answered', async (t) => {
  const stack = await buildStack(t, 1)
  const app = stack.apps[0]!
  const id = stack.sandbox.control.seedAppointment(ALICE).id
  const port = Number(new URL(await listen(app)).port)
  const socket = connect(port, '127.0.0.1')
  socket.on('error', () => {})
  let received = ''
  socket.on('data', (chunk: Buffer) => { received += chunk.toString('latin1') })
  socket.write(`POST /appointments/${id}/cancel HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${stack.tokens[0]!}\r\ncontent-type: application/json\r\ncontent-length: 40\r\nx-request-id: slow-body\r\n\r\n{"reason":`)
  // Node's deadline for a whole request: 10 s (REQUEST_TIMEOUT_MS, fixed when the server listens).
  await until(() => received.includes('\r\n\r\n'), 12_000)
  t.match(received, /^HTTP\/1\.1 408 /, 'answered 408')
  t.match(received, /x-request-id: slow-body/)
  socket.destroy()
  await trailIs(t, stack, {
    'slow-body': { appointmentId: id, outcome: 'VALIDATION_FAILED', status: 408, upstreamStatus: null, earlier: null }
  })
  t.equal(posts(stack.sandbox), 0)
  // One request, one line: its route's, with the parser's reason; it was routed, so it is counted
  // under its route, not among the refusals before routing.
  const access = stack.lines.map((line) => JSON.parse(line) as { msg: string, reqId?: string })
    .filter((line) => line.reqId === 'slow-body' && (line.msg === 'request completed' || line.msg.startsWith('request refused')))
  t.equal(access.length, 1, 'one access line')
  t.match(access[0], { msg: 'request completed', res: { statusCode: 408 }, code: 'VALIDATION_FAILED', parserError: 'ERR_HTTP_REQUEST_TIMEOUT' })
  const metrics = await app.metrics.registry.metrics()
  t.match(metrics, /\nhttp_request_duration_seconds_count\{method="POST",route="\/appointments\/:id\/cancel",status_code="408"\} 1\n/, 'counted under its route')
  t.match(metrics, /\nbff_http_refused_before_routing_total\{status_code="408"\} 0\n/, 'not as refused before routing')
})

t.test('two replicas: a keyed cancel by agentEventId lost on one, the appointment cancelled by its id, confirmed on the other: one appointment', async (t) => {
  const stack = await buildStack(t, 2, {}, await startRedis(t))
  const appointment = stack.sandbox.control.seedAppointment(ALICE)
  stack.sandbox.control.setFailure({ kind: 'reset', endpoint: 'cancel', times: 1 })
  t.equal((await cancel(stack, 'r-ae-unknown', appointment.agentEventId.toUpperCase(), { key: 'r-ae-key' })).status, 502)
  t.equal((await cancel(stack, 'r-ae-by-id', appointment.id, { reason: null, app: 1 })).status, 200)
  t.equal((await cancel(stack, 'r-ae-confirmed', appointment.agentEventId, { key: 'r-ae-key', app: 1 })).status, 200)
  await trailIs(t, stack, {
    'r-ae-unknown': { appointmentId: appointment.id, outcome: 'UPSTREAM_ERROR', status: 502, upstreamStatus: null, earlier: null },
    'r-ae-by-id': { appointmentId: appointment.id, outcome: 'cancelled', status: 200, upstreamStatus: 200, earlier: null },
    'r-ae-confirmed': { appointmentId: appointment.id, outcome: 'cancelled', status: 200, upstreamStatus: null, earlier: 'confirmed' }
  })
  t.same(counted(stack.lines), [appointment.id])
})

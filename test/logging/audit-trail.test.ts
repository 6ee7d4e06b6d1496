import t, { type Test } from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { buildTestApp, signIn } from '../helpers/app.js'
import { SANDBOX_KEY, startSandbox, type RunningSandbox } from '../helpers/sandbox.js'
import { startRedis, type RedisServer } from '../helpers/redis.js'
import { scanLogs, UNLIMITED } from '../fault/support.js'
import type { App } from '../../src/app.js'

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
      env: { CV_API_KEY: SANDBOX_KEY, CV_TIMEOUT_MS: '400', ...UNLIMITED, ...env }
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
  control.setFailure({ kind: 'slow', delayMs: 1000, endpoint: 'cancel', times: 1 })
  t.equal((await cancel(stack, 'own-timeout', ids[4]!)).status, 504)
  control.setFailure({ kind: 'reset', endpoint: 'cancel', times: 1 })
  t.equal((await cancel(stack, 'own-reset', ids[5]!)).status, 502)
  control.setFailure({ kind: 'reset-after-apply', endpoint: 'cancel', times: 1 })
  t.equal((await cancel(stack, 'own-reset-applied', ids[6]!)).status, 502)
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
  control.setFailure({ kind: 'slow-after-apply', delayMs: 1000, endpoint: 'cancel', times: 1 })
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

t.test('refusals before the cancel: per-session limit, org budget, validation, no session', async (t) => {
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

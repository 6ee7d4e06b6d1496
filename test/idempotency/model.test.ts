import { randomUUID } from 'node:crypto'
import { once } from 'node:events'
import { connect, type AddressInfo } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import fc from 'fast-check'
import t, { type Test } from 'tap'
import { buildTestApp, signIn } from '../helpers/app.js'
import { SANDBOX_KEY, startSandbox, type RunningSandbox } from '../helpers/sandbox.js'
import { startRedis, redisClient } from '../helpers/redis.js'
import { Browser } from '../web/browser.js'
import { SESSION_COOKIE, startWebStack } from '../web/stack.js'
import type { Failure } from '../../src/care360/sandbox.js'
import type { App } from '../../src/app.js'

/**
 * A model of the contract's Idempotency-Key rules (cancel route, step 5), checked against real
 * apps (one on memory state; two sharing one throwaway Redis) in front of the real sandbox, over
 * random command sequences: the same key from the same patient (either of their sessions, either
 * replica) replays the first answer, status and body, with `idempotent-replayed: true` and no
 * upstream cancel; another appointment or reason is 422; a key in flight is 409; refusals before
 * the cancel leave the key free; an unknown outcome is resolved from the upstream's list.
 */

type Mode = 'ok' | 's400' | 's404' | 's500' | 's429' | 'reset' | 'resetApplied' | 'timeout' | 'timeoutApplied'
type Refusal = 'none' | 'noSession' | 'badId' | 'badBody' | 'badKey'

interface CancelCmd {
  kind: 'cancel'
  app: number
  session: number
  key: number | null
  appt: number
  reason: number
  mode: Mode
  refusal: Refusal
  /** The id in upper case: the same appointment (UUIDs compare case-insensitively). */
  upper: boolean
}

interface FlightCmd {
  kind: 'flight'
  app: number
  otherApp: number
  session: number
  appt: number
  reason: number
}

/** A retry of an earlier cancel of this run (the way apps retry): from either session of its patient, on either replica. */
interface RetryCmd {
  kind: 'retry'
  pick: number
  otherSession: boolean
  app: number
  mode: Mode
  upper: boolean
}

/** The same cancel sent at once from several places (a double tap, a retry racing its first). */
interface BurstCmd {
  kind: 'burst'
  keyed: boolean
  patient: number
  appt: number
  reason: number
  /** Per copy: which replica and which of the patient's sessions. */
  copies: Array<{ app: number, session: number }>
}

type Cmd = CancelCmd | FlightCmd | RetryCmd | BurstCmd

const modeArb = fc.constantFrom<Mode>('ok', 'ok', 'ok', 'ok', 's400', 's404', 's500', 's429', 'reset', 'resetApplied', 'timeout', 'timeoutApplied')

const PATIENTS = ['alice@example.com', 'bob@example.com']
// Two sessions each: sessions 0, 1 are alice's, 2, 3 bob's.
const SESSION_PATIENT = [0, 0, 1, 1]
const REASONS: Array<string | undefined> = [undefined, 'Feeling better', 'Travelling']

const FAILURES: Record<Exclude<Mode, 'ok'>, Failure> = {
  s400: { kind: 'status', status: 400, body: { status: 400, success: false, message: 'Invalid request', error: 'appointment already started' } },
  s404: { kind: 'status', status: 404, body: { status: 404, success: false, message: 'Appointment not found', error: 'NotFoundError' } },
  s500: { kind: 'status', status: 500, body: { status: 500, success: false, message: 'boom' } },
  s429: { kind: 'rate-limited', retryAfter: '1' },
  reset: { kind: 'reset' },
  resetApplied: { kind: 'reset-after-apply' },
  // Past CV_TIMEOUT_MS (500): the first is given up (not applied), the second applied first.
  timeout: { kind: 'slow', delayMs: 900 },
  timeoutApplied: { kind: 'slow-after-apply', delayMs: 900 }
}

const cmdArb = (apps: number): fc.Arbitrary<Cmd> => fc.oneof(
  {
    weight: 12,
    arbitrary: fc.record<CancelCmd>({
      kind: fc.constant('cancel' as const),
      app: fc.nat({ max: apps - 1 }),
      session: fc.nat({ max: 3 }),
      key: fc.option(fc.nat({ max: 2 }), { freq: 5 }),
      // 0, 1: alice's; 2, 3: bob's; 4: nobody's.
      appt: fc.nat({ max: 4 }),
      reason: fc.nat({ max: 2 }),
      mode: modeArb,
      refusal: fc.constantFrom<Refusal>('none', 'none', 'none', 'none', 'none', 'noSession', 'badId', 'badBody', 'badKey'),
      upper: fc.boolean()
    })
  },
  {
    weight: 8,
    arbitrary: fc.record<RetryCmd>({
      kind: fc.constant('retry' as const),
      pick: fc.nat({ max: 30 }),
      otherSession: fc.boolean(),
      app: fc.nat({ max: apps - 1 }),
      mode: modeArb,
      upper: fc.boolean()
    })
  },
  {
    weight: 1,
    arbitrary: fc.record<BurstCmd>({
      kind: fc.constant('burst' as const),
      keyed: fc.boolean(),
      patient: fc.nat({ max: 1 }),
      appt: fc.nat({ max: 1 }),
      reason: fc.nat({ max: 2 }),
      copies: fc.array(fc.record({ app: fc.nat({ max: apps - 1 }), session: fc.nat({ max: 1 }) }), { minLength: 2, maxLength: 4 })
    })
  },
  {
    weight: 1,
    arbitrary: fc.record<FlightCmd>({
      kind: fc.constant('flight' as const),
      app: fc.nat({ max: apps - 1 }),
      otherApp: fc.nat({ max: apps - 1 }),
      session: fc.nat({ max: 3 }),
      appt: fc.nat({ max: 3 }),
      reason: fc.nat({ max: 2 })
    })
  }
)

type Rec =
  | { state: 'done', appt: string, reason: string | undefined, status: number, body: unknown }
  | { state: 'unknown', appt: string, reason: string | undefined }

interface Answer { status: number, body: Record<string, unknown>, headers: Record<string, unknown> }

interface Stack {
  apps: App[]
  sandbox: RunningSandbox
  tokens: string[]
  logs: string[]
  keysUsed: Set<string>
  /** What the runs met, by kind of answer: shown at the end, so that a weak generator shows. */
  seen: Map<string, number>
  /** Appointments some request was answered 200 for, by its own cancel or a confirmation. */
  cancelledWith200: Set<string>
}

async function buildStack (t: Test, replicas: 1 | 2, env: Record<string, string> = {}, now?: () => number): Promise<Stack> {
  // Neither its quota (500/60s) nor the org budget is what this test is about: a long run (MODEL_RUNS)
  // makes more calls than either allows, and their 429s are not the model's.
  const sandbox = await startSandbox(t, { quota: { count: 1_000_000, windowMs: 60_000 } })
  const redis = replicas === 2 ? await startRedis(t) : undefined
  const logs: string[] = []
  const logStream = { write (line: string) { logs.push(line) } }
  const apps: App[] = []
  let issuerOfFirst: Parameters<typeof signIn>[1] | undefined
  for (let i = 0; i < replicas; i++) {
    const { app, issuer } = await buildTestApp(t, {
      upstreamUrl: sandbox.url,
      ...(redis === undefined ? {} : { redis }),
      logStream,
      ...(now === undefined ? {} : { now }),
      env: {
        CV_API_KEY: SANDBOX_KEY,
        CV_TIMEOUT_MS: '500',
        RATE_LIMIT_CANCEL: '10000/1m',
        RATE_LIMIT_SESSION: '10000/1m',
        RATE_LIMIT_IP: '10000/1m',
        CV_RATE_LIMIT: '1000000/60s',
        LOG_LEVEL: 'debug',
        SERVICE_SECRET: 'model-test-service-secret-0123456789abcdef',
        ...env
      }
    })
    apps.push(app)
    issuerOfFirst ??= issuer
  }
  const tokens: string[] = []
  for (const patient of SESSION_PATIENT) tokens.push(await signIn(apps[0]!, issuerOfFirst!, PATIENTS[patient]))
  return { apps, sandbox, tokens, logs, keysUsed: new Set(), seen: new Map(), cancelledWith200: new Set() }
}

async function send (app: App, token: string | null, id: string, reason: string | undefined, headers: Record<string, string>, extra: Record<string, unknown> = {}): Promise<Answer> {
  const payload = reason === undefined && Object.keys(extra).length === 0 ? undefined : { ...(reason === undefined ? {} : { reason }), ...extra }
  const res = await app.inject({
    method: 'POST',
    url: `/appointments/${id}/cancel`,
    headers: { ...(token === null ? {} : { authorization: `Bearer ${token}` }), ...headers },
    ...(payload === undefined ? {} : { payload })
  })
  return { status: res.statusCode, body: res.json(), headers: res.headers }
}

const cancelCalls = (sandbox: RunningSandbox): number => sandbox.control.calls.filter((call) => call.method === 'POST').length

/** One run of the model: fresh appointments and fresh keys, so runs never meet. */
async function runModel (t: Test, stack: Stack, cmds: Cmd[], replicas: 1 | 2): Promise<void> {
  const { apps, sandbox, tokens } = stack
  const run = randomUUID().slice(0, 8)
  sandbox.control.clearFailure()
  const appts = [
    sandbox.control.seedAppointment(PATIENTS[0]!).id,
    sandbox.control.seedAppointment(PATIENTS[0]!).id,
    sandbox.control.seedAppointment(PATIENTS[1]!).id,
    sandbox.control.seedAppointment(PATIENTS[1]!).id,
    randomUUID()
  ]
  const owner = (appt: number): number | null => appt < 2 ? 0 : appt < 4 ? 1 : null
  const keyText = (key: number): string => `MODELKEY-${run}-${key}`
  const cancelled = new Set<string>()
  const records = new Map<string, Rec>()
  const recordId = (patient: number, key: string): string => `${patient}\0${key}`
  let flights = 0

  const saw = (kind: string): void => { stack.seen.set(kind, (stack.seen.get(kind) ?? 0) + 1) }
  const fail = (message: string, detail: unknown): never => {
    throw new Error(`${message}: ${JSON.stringify(detail)}`)
  }

  /** Checks a fresh run (no record, or a record whose cancel must be sent now) and returns what the key keeps. */
  function checkFresh (cmd: CancelCmd, appt: string, answer: Answer, delta: number, keyed: boolean): Rec | 'release' | 'none' {
    const patient = SESSION_PATIENT[cmd.session]!
    const reason = REASONS[cmd.reason]
    const what = { cmd, answer: { status: answer.status, body: answer.body }, delta }
    saw(`fresh ${answer.status} ${String(answer.body.code ?? '')}`)
    if (answer.headers['idempotent-replayed'] !== undefined) fail('a fresh run carries idempotent-replayed', what)
    const done = (): Rec => ({ state: 'done', appt, reason, status: answer.status, body: answer.body })
    if (owner(cmd.appt) !== patient) {
      if (answer.status !== 404 || answer.body.code !== 'APPOINTMENT_NOT_FOUND' || delta !== 0) fail('not the patient\'s: 404 without a cancel', what)
      return done()
    }
    if (cancelled.has(appt)) {
      // Already cancelled: the ownership check says 404; another replica's cached list may still
      // hold it, and then the upstream refuses it (400). Without a key, an identical cancel within
      // 0.5 s of a 200 shares that 200.
      const ok404 = answer.status === 404 && answer.body.code === 'APPOINTMENT_NOT_FOUND' && delta === 0
      const ok400 = replicas === 2 && answer.status === 400 && answer.body.code === 'UPSTREAM_REJECTED' && delta === 1
      const shared = !keyed && answer.status === 200 && delta === 0
      if (!ok404 && !ok400 && !shared) fail('already cancelled: 404 (or the upstream\'s 400)', what)
      return done()
    }
    const expect = (status: number, code: string | undefined): void => {
      if (answer.status !== status || answer.body.code !== code || delta !== 1) fail(`mode ${cmd.mode}: ${status} ${code ?? ''} after one cancel call`, what)
    }
    switch (cmd.mode) {
      case 'ok': expect(200, undefined); cancelled.add(appt); stack.cancelledWith200.add(appt); return done()
      case 's400': expect(400, 'UPSTREAM_REJECTED'); return done()
      case 's404': expect(404, 'APPOINTMENT_NOT_FOUND'); return done()
      case 's500': expect(502, 'UPSTREAM_ERROR'); return done()
      case 's429': expect(429, 'UPSTREAM_RATE_LIMITED'); return 'release'
      case 'reset': expect(502, 'UPSTREAM_ERROR'); return { state: 'unknown', appt, reason }
      case 'resetApplied': expect(502, 'UPSTREAM_ERROR'); cancelled.add(appt); return { state: 'unknown', appt, reason }
      case 'timeout': expect(504, 'UPSTREAM_TIMEOUT'); return { state: 'unknown', appt, reason }
      case 'timeoutApplied': expect(504, 'UPSTREAM_TIMEOUT'); cancelled.add(appt); return { state: 'unknown', appt, reason }
    }
  }

  async function doCancel (cmd: CancelCmd): Promise<void> {
    const app = apps[cmd.app]!
    const patient = SESSION_PATIENT[cmd.session]!
    const appt = appts[cmd.appt]!
    const reason = REASONS[cmd.reason]
    const key = cmd.key === null ? undefined : keyText(cmd.key)
    if (key !== undefined) stack.keysUsed.add(key)
    const headers: Record<string, string> = key === undefined ? {} : { 'idempotency-key': key }
    const before = cancelCalls(sandbox)
    const beforeAny = sandbox.control.calls.length
    const what = (answer: Answer) => ({ cmd, status: answer.status, body: answer.body })

    if (cmd.refusal !== 'none') {
      const answer = cmd.refusal === 'noSession'
        ? await send(app, cmd.key === 0 ? null : 'not-a-session-token', appt, reason, headers)
        : cmd.refusal === 'badId'
          ? await send(app, tokens[cmd.session]!, `${appt}x`, reason, headers)
          : cmd.refusal === 'badBody'
            ? await send(app, tokens[cmd.session]!, appt, reason, headers, { email: 'bob@example.com' })
            : await send(app, tokens[cmd.session]!, appt, reason, { 'idempotency-key': `${key ?? 'k'} with spaces` })
      const [status, code] = cmd.refusal === 'noSession' ? [401, 'SESSION_REQUIRED'] : [400, 'VALIDATION_FAILED']
      saw(`refusal ${cmd.refusal}`)
      if (answer.status !== status || answer.body.code !== code) fail(`refusal ${cmd.refusal}: ${status}`, what(answer))
      if (cancelCalls(sandbox) !== before) fail('a refusal reached the upstream', what(answer))
      return
    }

    const existing = key === undefined ? undefined : records.get(recordId(patient, key))
    const sameBody = existing !== undefined && existing.appt === appt && existing.reason === reason
    // Arm the upstream only when the cancel would go: an armed failure outlives a request that
    // never sent its cancel, and an already-cancelled appointment is answered as it is.
    const mayGo = owner(cmd.appt) === patient && !cancelled.has(appt) && (existing === undefined || (existing.state === 'unknown' && sameBody))
    if (mayGo && cmd.mode !== 'ok') sandbox.control.setFailure({ ...FAILURES[cmd.mode], endpoint: 'cancel', times: 1 })
    const answer = await send(app, tokens[cmd.session]!, cmd.upper ? appt.toUpperCase() : appt, reason, headers)
    sandbox.control.clearFailure()
    const delta = cancelCalls(sandbox) - before
    // A replay, a mismatch: no upstream call of any kind (not even the ownership list).
    const quiet = (answer: Answer): void => {
      if (sandbox.control.calls.length !== beforeAny) fail('a replay or a refusal of the key called the upstream', what(answer))
    }

    if (key === undefined) {
      checkFresh(cmd, appt, answer, delta, false)
    } else if (existing !== undefined && !sameBody) {
      saw('mismatch')
      if (answer.status !== 422 || answer.body.code !== 'IDEMPOTENCY_MISMATCH' || delta !== 0) fail('another body under a used key: 422 without a cancel', what(answer))
      if (answer.headers['idempotent-replayed'] !== undefined) fail('a 422 is no replay', what(answer))
      quiet(answer)
    } else if (existing?.state === 'done') {
      saw(`replay ${existing.status}`)
      if (answer.status !== existing.status || delta !== 0) fail('a replay: the first status, without a cancel', { ...what(answer), first: existing })
      if (JSON.stringify(answer.body) !== JSON.stringify(existing.body)) fail('a replay: the first body', { ...what(answer), first: existing })
      if (answer.headers['idempotent-replayed'] !== 'true') fail('a replay carries idempotent-replayed: true', what(answer))
      quiet(answer)
    } else if (existing?.state === 'unknown' && cancelled.has(appt)) {
      // The earlier cancel (or another) took effect: confirmed from the list, no cancel sent.
      saw('confirmed')
      if (answer.status !== 200 || delta !== 0 || !/confirmed/.test(String(answer.body.message))) fail('an unknown outcome that took effect is confirmed', what(answer))
      if (answer.headers['idempotent-replayed'] !== undefined) fail('a confirmation is no replay', what(answer))
      records.set(recordId(patient, key), { state: 'done', appt, reason, status: 200, body: answer.body })
      stack.cancelledWith200.add(appt)
    } else {
      const kept = checkFresh(cmd, appt, answer, delta, true)
      if (kept === 'release') records.delete(recordId(patient, key))
      else if (kept !== 'none') records.set(recordId(patient, key), kept)
    }
    // The upstream's 429 starts a shared cooldown (at least 1 s, doubled by another 429 soon
    // after: Retry-After says how long): let it end, so that the next command meets the upstream.
    if (answer.status === 429) {
      const retryAfter = Number(answer.headers['retry-after'])
      if (!(retryAfter >= 1)) fail('a 429 says when to retry', { ...what(answer), headers: answer.headers })
      await sleep(retryAfter * 1000 + 100)
    }
  }

  async function doFlight (cmd: FlightCmd): Promise<void> {
    const patient = SESSION_PATIENT[cmd.session]!
    const own = [0, 1].map((i) => i + patient * 2).filter((i) => !cancelled.has(appts[i]!))
    if (own.length === 0) return
    const appt = appts[own[cmd.appt % own.length]!]!
    const reason = REASONS[cmd.reason]
    const key = `MODELKEY-${run}-flight-${flights++}`
    stack.keysUsed.add(key)
    const other = patient * 2 + (1 - (cmd.session % 2))
    const before = cancelCalls(sandbox)
    sandbox.control.setFailure({ kind: 'slow', delayMs: 300, endpoint: 'cancel', times: 1 })
    const first = send(apps[cmd.app]!, tokens[cmd.session]!, appt, reason, { 'idempotency-key': key })
    const end = Date.now() + 3000
    while (cancelCalls(sandbox) === before && Date.now() < end) await sleep(5)
    if (cancelCalls(sandbox) === before) fail('the held cancel never reached the upstream', cmd)
    // The patient's other session, on either replica: the same key is still in flight.
    const again = await send(apps[cmd.otherApp]!, tokens[other]!, appt, reason, { 'idempotency-key': key })
    saw('in flight')
    if (again.status !== 409 || again.body.code !== 'IDEMPOTENCY_IN_FLIGHT' || !/^[12]$/.test(String(again.headers['retry-after']))) {
      fail('a key in flight: 409 with Retry-After', { cmd, status: again.status, body: again.body, headers: again.headers })
    }
    // Another patient's request under the same key text is theirs alone: never 409, never 422.
    const stranger = (1 - patient) * 2
    const theirs = await send(apps[cmd.otherApp]!, tokens[stranger]!, appts[4]!, reason, { 'idempotency-key': key })
    if (theirs.status !== 404 || theirs.body.code !== 'APPOINTMENT_NOT_FOUND') fail('another patient\'s key is not this one', { cmd, status: theirs.status, body: theirs.body })
    records.set(recordId(1 - patient, key), { state: 'done', appt: appts[4]!, reason, status: 404, body: theirs.body })
    const otherReason = await send(apps[cmd.otherApp]!, tokens[other]!, appt, reason === undefined ? 'x' : undefined, { 'idempotency-key': key })
    if (otherReason.status !== 422 || otherReason.body.code !== 'IDEMPOTENCY_MISMATCH') fail('another reason under a key in flight: 422', { cmd, status: otherReason.status })
    const answer = await first
    sandbox.control.clearFailure()
    if (answer.status !== 200 || cancelCalls(sandbox) - before !== 1) fail('the held cancel: 200 after one call', { cmd, status: answer.status, body: answer.body })
    cancelled.add(appt)
    stack.cancelledWith200.add(appt)
    records.set(recordId(patient, key), { state: 'done', appt, reason, status: 200, body: answer.body })
  }

  async function doBurst (cmd: BurstCmd): Promise<void> {
    const appt = appts[cmd.patient * 2 + cmd.appt]!
    if (cancelled.has(appt)) return
    const reason = REASONS[cmd.reason]
    const key = `MODELKEY-${run}-burst-${flights++}`
    stack.keysUsed.add(key)
    const before = cancelCalls(sandbox)
    // Held a little, so that the copies overlap the first.
    sandbox.control.setFailure({ kind: 'slow', delayMs: 150, endpoint: 'cancel', times: 1 })
    const answers = await Promise.all(cmd.copies.map(({ app, session }) =>
      send(apps[app]!, tokens[cmd.patient * 2 + session]!, appt, reason, cmd.keyed ? { 'idempotency-key': key } : {})))
    sandbox.control.clearFailure()
    const delta = cancelCalls(sandbox) - before
    const what = { cmd, delta, answers: answers.map((answer) => ({ status: answer.status, body: answer.body, replayed: answer.headers['idempotent-replayed'] })) }
    saw(`burst ${cmd.keyed ? 'keyed' : 'keyless'}`)
    if (delta !== 1) fail('identical cancels at once: one upstream cancel', what)
    const fresh = answers.filter((answer) => answer.status === 200 && answer.headers['idempotent-replayed'] === undefined)
    const ok = cmd.keyed
      ? fresh.length === 1 && answers.every((answer) => answer === fresh[0] ||
        (answer.status === 409 && answer.body.code === 'IDEMPOTENCY_IN_FLIGHT') ||
        (answer.status === 200 && answer.headers['idempotent-replayed'] === 'true' && JSON.stringify(answer.body) === JSON.stringify(fresh[0]!.body)))
      : answers.every((answer) => answer.status === 200)
    if (!ok) fail(cmd.keyed ? 'one keyed copy runs; the others are 409 or its replay' : 'identical key-less copies share the one 200', what)
    cancelled.add(appt)
    stack.cancelledWith200.add(appt)
    if (cmd.keyed) records.set(recordId(cmd.patient, key), { state: 'done', appt, reason, status: 200, body: fresh[0]!.body })
  }

  const history: CancelCmd[] = []
  for (const cmd of cmds) {
    if (cmd.kind === 'cancel') {
      await doCancel(cmd)
      if (cmd.refusal === 'none') history.push(cmd)
    } else if (cmd.kind === 'retry') {
      const earlier = history[cmd.pick % Math.max(1, history.length)]
      if (earlier === undefined) continue
      const session = cmd.otherSession ? earlier.session ^ 1 : earlier.session
      await doCancel({ ...earlier, session, app: cmd.app, mode: cmd.mode, upper: cmd.upper })
    } else if (cmd.kind === 'burst') {
      await doBurst(cmd)
    } else {
      await doFlight(cmd)
    }
  }
  // Every stored answer replays once more, from the patient's other session and every replica.
  for (const [id, rec] of records) {
    if (rec.state !== 'done') continue
    const [patient, key] = id.split('\0') as [string, string]
    for (const app of apps) {
      const before = cancelCalls(sandbox)
      const answer = await send(app, tokens[Number(patient) * 2 + 1]!, rec.appt, rec.reason, { 'idempotency-key': key })
      if (answer.status !== rec.status || JSON.stringify(answer.body) !== JSON.stringify(rec.body) || answer.headers['idempotent-replayed'] !== 'true' || cancelCalls(sandbox) !== before) {
        fail('a final replay differs from the first answer', { key, first: rec, status: answer.status, body: answer.body })
      }
    }
  }
  t.pass(`run ${run}: ${cmds.length} commands, ${records.size} keys held`)
}

/**
 * Runs and time of each property: 8 within 2.5 s in the suite; a longer search by command, e.g.
 * `MODEL_RUNS=200 MODEL_MS=90000 npx tap -t 600 --disable-coverage test/idempotency/model.test.ts`.
 */
const RUNS = Number(process.env.MODEL_RUNS) > 0 ? Number(process.env.MODEL_RUNS) : 8
const BUDGET_MS = Number(process.env.MODEL_MS) > 0 ? Number(process.env.MODEL_MS) : 2500

async function property (t: Test, replicas: 1 | 2, numRuns: number): Promise<void> {
  const stack = await buildStack(t, replicas)
  // Bounded in time as well as in runs (the upstream's 429 and timeouts each cost about a second):
  // on a busy machine the runs after BUDGET_MS pass at once, never a slower file. Not fast-check's
  // interruptAfterTimeLimit: it leaves the run in flight going on against an app already closed.
  const ends = performance.now() + BUDGET_MS
  let ran = 0
  await fc.assert(fc.asyncProperty(fc.array(cmdArb(replicas), { minLength: 4, maxLength: 16, size: 'max' }), async (cmds) => {
    if (performance.now() > ends) return
    ran++
    await runModel(t, stack, cmds, replicas)
  }), { numRuns, endOnFailure: true, ...(process.env.MODEL_SEED === undefined ? {} : { seed: Number(process.env.MODEL_SEED) }) })
  t.ok(ran > 0, `${ran} of ${numRuns} runs within the time bound`)
  // The audit trail (README, Operations): a request's own 200 is written once per appointment (the
  // upstream never cancels one twice); counting the distinct appointments among the own 200s and
  // the confirmations gives exactly those some request was answered 200 for. A confirmation may
  // follow another request's own 200 (an unknown outcome, then a key-less cancel, then the retry).
  await sleep(100)
  const own = new Map<string, number>()
  const counted = new Set<string>()
  for (const line of stack.logs) {
    const audit = (JSON.parse(line) as { audit?: { outcome: string, earlier: string | null, appointmentId: string } }).audit
    if (audit?.outcome !== 'cancelled' || (audit.earlier !== null && audit.earlier !== 'confirmed')) continue
    counted.add(audit.appointmentId)
    if (audit.earlier === null) own.set(audit.appointmentId, (own.get(audit.appointmentId) ?? 0) + 1)
  }
  t.same([...own].filter(([, count]) => count > 1), [], 'no appointment has two records of its own 200')
  t.same([...stack.cancelledWith200].filter((id) => !counted.has(id)), [], 'every cancel answered 200 is counted')
  t.same([...counted].filter((id) => !stack.cancelledWith200.has(id)), [], 'nothing is counted that no request was answered 200 for')
  // The key is never logged, in any form the client sent it.
  const leaked = [...stack.keysUsed].filter((key) => stack.logs.some((line) => line.includes(key)))
  t.same(leaked, [], 'no Idempotency-Key in any log line')
  t.ok(stack.logs.length > 0, 'the log lines were captured')
  t.comment([...stack.seen].sort().map(([kind, count]) => `${kind}: ${count}`).join('; '))
}

t.test('model: one app on memory state', async (t) => {
  await property(t, 1, RUNS)
})

t.test('model: two replicas sharing one Redis', async (t) => {
  await property(t, 2, RUNS)
})

/** One request over a real socket, its header block written byte for byte (`Connection: close`). */
async function raw (port: number, head: Buffer): Promise<{ status: number, headers: string, body: string }> {
  const socket = connect({ host: '127.0.0.1', port })
  const chunks: Buffer[] = []
  socket.on('data', (chunk: Buffer) => { chunks.push(chunk) })
  socket.setTimeout(5000, () => { socket.destroy() })
  socket.write(head)
  await once(socket, 'close')
  const text = Buffer.concat(chunks).toString('latin1')
  const [headers = '', body = ''] = text.split('\r\n\r\n')
  return { status: Number(/^HTTP\/1\.1 (\d{3})/.exec(headers)?.[1] ?? 0), headers, body }
}

t.test('key spellings at the boundary, over a real socket: 1 and 255 visible ASCII characters are keys; 0, 256, a space, a control character and non-ASCII are 400 and send nothing', async (t) => {
  const stack = await buildStack(t, 1)
  const app = stack.apps[0]!
  await app.listen({ host: '127.0.0.1', port: 0 })
  const port = (app.server.address() as AddressInfo).port
  const token = stack.tokens[0]!
  const request = (id: string, keyLines: Buffer[]): Buffer => Buffer.concat([
    Buffer.from(`POST /appointments/${id}/cancel HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${token}\r\nConnection: close\r\n`, 'latin1'),
    ...keyLines.flatMap((line) => [Buffer.from('Idempotency-Key:', 'latin1'), line, Buffer.from('\r\n', 'latin1')]),
    Buffer.from('\r\n', 'latin1')
  ])
  const seed = (): string => stack.sandbox.control.seedAppointment(PATIENTS[0]!).id
  const calls = (): number => cancelCalls(stack.sandbox)

  const accepted: Array<[string, string]> = [
    ['1 character', '!'],
    ['1 character, the last visible one', '~'],
    ['255 characters', `K${'x'.repeat(253)}~`],
    ['every visible ASCII character', Array.from({ length: 94 }, (_, i) => String.fromCharCode(0x21 + i)).join('')]
  ]
  for (const [label, key] of accepted) {
    const id = seed()
    const before = calls()
    const first = await raw(port, request(id, [Buffer.from(` ${key}`, 'latin1')]))
    t.equal(first.status, 200, `${label}: runs`)
    const again = await raw(port, request(id, [Buffer.from(` ${key}`, 'latin1')]))
    t.equal(again.status, 200, `${label}: replayed`)
    t.match(again.headers, /\r\nidempotent-replayed: true\r\n/i)
    t.equal(calls() - before, 1, `${label}: one cancel`)
    stack.keysUsed.add(key)
  }

  // Optional whitespace around a field value is not part of it (RFC 9110, 5.5): the same key.
  const padded = seed()
  t.equal((await raw(port, request(padded, [Buffer.from('   spaced-key-1\t ', 'latin1')]))).status, 200)
  const unpadded = await raw(port, request(padded, [Buffer.from('spaced-key-1', 'latin1')]))
  t.match(unpadded.headers, /\r\nidempotent-replayed: true\r\n/i, 'surrounding whitespace is not part of the key')
  // Keys compare exactly: another case is another key (a new action), never a mismatch.
  const cased = seed()
  const upper = await raw(port, request(cased, [Buffer.from('SPACED-KEY-1', 'latin1')]))
  t.equal(upper.status, 200, 'another case of a key is another key')
  t.notMatch(upper.headers, /idempotent-replayed/i)

  const refused: Array<[string, Buffer[]]> = [
    ['0 characters', [Buffer.from('', 'latin1')]],
    ['only whitespace', [Buffer.from('   ', 'latin1')]],
    ['256 characters', [Buffer.from(`K${'x'.repeat(254)}~`, 'latin1')]],
    ['an inner space', [Buffer.from('has space', 'latin1')]],
    ['an inner tab', [Buffer.from('has\ttab', 'latin1')]],
    ['DEL', [Buffer.from('del\x7fkey', 'latin1')]],
    ['a control character', [Buffer.from('bell\x07key', 'latin1')]],
    ['UTF-8 non-ASCII', [Buffer.from('clé-1', 'utf8')]],
    ['Latin-1 non-ASCII', [Buffer.from('cl\xe9-1', 'latin1')]],
    ['two fields', [Buffer.from('twice-1', 'latin1'), Buffer.from('twice-2', 'latin1')]],
    ['two fields, the same key', [Buffer.from('twice-3', 'latin1'), Buffer.from('twice-3', 'latin1')]]
  ]
  const id = seed()
  for (const [label, lines] of refused) {
    const before = stack.sandbox.control.calls.length
    const answer = await raw(port, request(id, lines))
    t.equal(answer.status, 400, `${label}: 400`)
    t.match(answer.body, /"code":"VALIDATION_FAILED"/, `${label}: VALIDATION_FAILED`)
    t.equal(stack.sandbox.control.calls.length, before, `${label}: no upstream call at all`)
    for (const line of lines) if (line.length > 3) stack.keysUsed.add(line.toString('latin1'))
  }
  t.notOk(stack.sandbox.control.isCancelled(id))
  const leaked = [...stack.keysUsed].filter((key) => stack.logs.some((line) => line.includes(key)))
  t.same(leaked, [], 'no key, valid or not, in any log line')
})

t.test('24 hours: memory state replays a key until then and forgets it after (the wall clock moved for the store only)', async (t) => {
  // The memory store reads Date.now when it is built, so the clock is moved before the app is
  // built; the sessions, ID tokens and limits keep the real one (buildTestApp's `now`).
  const realNow = Date.now
  let skew = 0
  Date.now = () => realNow() + skew
  t.teardown(() => { Date.now = realNow })
  const stack = await buildStack(t, 1, {}, () => realNow())
  const app = stack.apps[0]!
  const token = stack.tokens[0]!
  const first = stack.sandbox.control.seedAppointment(PATIENTS[0]!).id
  const second = stack.sandbox.control.seedAppointment(PATIENTS[0]!).id
  const key = { 'idempotency-key': 'day-key-1' }
  const answer = await send(app, token, first, 'r', key)
  t.equal(answer.status, 200)
  skew = 24 * 60 * 60 * 1000 - 60_000
  const replay = await send(app, token, first, 'r', key)
  t.equal(replay.status, 200, 'a minute before 24 h: replayed')
  t.equal(replay.headers['idempotent-replayed'], 'true')
  t.equal((await send(app, token, second, 'r', key)).status, 422, 'and still bound to its appointment')
  skew = 24 * 60 * 60 * 1000 + 2_000
  const later = await send(app, token, second, 'r', key)
  t.equal(later.status, 200, 'after 24 h the key is free: another appointment under it runs')
  t.equal(later.headers['idempotent-replayed'], undefined)
  t.equal(cancelCalls(stack.sandbox), 2)
})

t.test('24 hours: a Redis record lives 24 h from its answer, on Redis\'s clock', async (t) => {
  const stack = await buildStack(t, 2)
  const app = stack.apps[0]!
  const id = stack.sandbox.control.seedAppointment(PATIENTS[0]!).id
  t.equal((await send(app, stack.tokens[0]!, id, undefined, { 'idempotency-key': 'day-key-2' })).status, 200)
  const client = redisClient({ port: app.sharedState.redis!.options.port!, host: '127.0.0.1' })
  t.teardown(() => { client.disconnect() })
  const keys = await client.keys('idem:*')
  t.equal(keys.length, 1, 'one record')
  const ttl = await client.pttl(keys[0]!)
  t.ok(ttl > 24 * 60 * 60 * 1000 - 10_000 && ttl <= 24 * 60 * 60 * 1000, `its TTL is 24 h (${ttl} ms)`)
  t.notOk((await client.hvals(keys[0]!)).some((value) => value.includes('day-key-2')), 'the raw key is not stored')
})

t.test('a per-session 429 before the cancel releases the key: the patient\'s other session then runs it', async (t) => {
  const stack = await buildStack(t, 1, { RATE_LIMIT_CANCEL: '1/1m' })
  const app = stack.apps[0]!
  const id = stack.sandbox.control.seedAppointment(PATIENTS[0]!).id
  const other = stack.sandbox.control.seedAppointment(PATIENTS[0]!).id
  t.equal((await send(app, stack.tokens[0]!, other, undefined, {})).status, 200, 'session 0 spends its one cancel')
  const limited = await send(app, stack.tokens[0]!, id, 'r', { 'idempotency-key': 'limited-1' })
  t.equal(limited.status, 429)
  t.equal(limited.body.code, 'RATE_LIMITED')
  const elsewhere = await send(app, stack.tokens[1]!, id, 'r', { 'idempotency-key': 'limited-1' })
  t.equal(elsewhere.status, 200, 'the key was released: it runs')
  t.equal(elsewhere.headers['idempotent-replayed'], undefined)
  t.equal(cancelCalls(stack.sandbox), 2)
})

t.test('a CSRF refusal (403) leaves the key free: the same request with X-CSRF then runs, and replays', async (t) => {
  const stack = await startWebStack(t, { sandbox: true, env: { CORS_ORIGINS: 'https://app.example.com' } })
  const browser = new Browser()
  await stack.signIn(browser, PATIENTS[0]!)
  const cookie = stack.sessionOf(browser) as string
  const id = stack.sandbox!.control.seedAppointment(PATIENTS[0]!).id
  const cancel = async (headers: Record<string, string>) => await stack.app.inject({
    method: 'POST',
    url: `/appointments/${id}/cancel`,
    cookies: { [SESSION_COOKIE]: cookie },
    payload: { reason: 'r' },
    headers: { 'idempotency-key': 'csrf-key-1', ...headers }
  })
  const refusals: Array<Record<string, string>> = [{}, { 'x-csrf': '1', origin: 'https://evil.example' }]
  for (const headers of refusals) {
    const refused = await cancel(headers)
    t.equal(refused.statusCode, 403)
    t.equal(refused.json().code, 'CSRF_REJECTED')
  }
  const first = await cancel({ 'x-csrf': '1', origin: 'https://app.example.com' })
  t.equal(first.statusCode, 200, 'the key was never taken')
  t.equal(first.headers['idempotent-replayed'], undefined)
  const again = await cancel({ 'x-csrf': '1' })
  t.equal(again.statusCode, 200)
  t.equal(again.headers['idempotent-replayed'], 'true')
  t.equal(cancelCalls(stack.sandbox!), 1)
})

t.test('an unknown outcome, then a key-less cancel of the same appointment answered 200, then the keyed retry: confirmed, and the trail counts the appointment once', async (t) => {
  const stack = await buildStack(t, 1)
  const app = stack.apps[0]!
  const id = stack.sandbox.control.seedAppointment(PATIENTS[0]!).id
  stack.sandbox.control.setFailure({ kind: 'reset', endpoint: 'cancel', times: 1 })
  const first = await send(app, stack.tokens[0]!, id, undefined, { 'idempotency-key': 'unknown-then-other-1' })
  stack.sandbox.control.clearFailure()
  t.equal(first.status, 502, 'the first answer is lost: outcome unknown')
  t.notOk(stack.sandbox.control.isCancelled(id), 'and its cancel did not take effect')
  t.equal((await send(app, stack.tokens[1]!, id, undefined, {})).status, 200, 'a key-less cancel from the other session cancels it')
  const retry = await send(app, stack.tokens[0]!, id, undefined, { 'idempotency-key': 'unknown-then-other-1' })
  t.equal(retry.status, 200, 'the retry is confirmed: the appointment is cancelled')
  t.equal(retry.body.message, 'Appointment cancelled (confirmed: after an earlier request with this Idempotency-Key, Care360 no longer lists it)',
    'and its message does not claim that the first request did it')
  t.equal(cancelCalls(stack.sandbox), 2, 'no third cancel was sent')
  await sleep(100)
  const trail = stack.logs.flatMap((line) => {
    const audit = (JSON.parse(line) as { audit?: { appointmentId: string, outcome: string, earlier: string | null } }).audit
    return audit === undefined ? [] : [[audit.outcome, audit.earlier]]
  })
  t.same(trail, [['UPSTREAM_ERROR', null], ['cancelled', null], ['cancelled', 'confirmed']], 'three records: the unknown, the own 200, the confirmation')
  const appointments = new Set(stack.logs.flatMap((line) => {
    const audit = (JSON.parse(line) as { audit?: { appointmentId: string, outcome: string, earlier: string | null } }).audit
    return audit?.outcome === 'cancelled' && (audit.earlier === null || audit.earlier === 'confirmed') ? [audit.appointmentId] : []
  }))
  t.same([...appointments], [id], 'counted as the README says: one appointment')
})

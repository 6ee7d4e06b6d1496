import t from 'tap'
import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { startRedis } from '../helpers/redis.js'
import { SANDBOX_KEY } from '../helpers/sandbox.js'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'
import { call, captureLogs, checkAnswers, HangError, listen, outcome, scanLogs, startSandboxedApp, type Answer, type CallOptions } from './support.js'

/**
 * Redis (REDIS_URL) is killed under load and started again, empty, on the same port. Acceptable,
 * precisely:
 * - no request waits on Redis: every answer within BOUND_MS, none lost, no 500;
 * - while Redis is down, a route that needs the session answers 503 SERVICE_UNAVAILABLE with
 *   Retry-After (the session store never falls back to memory), or its normal answer;
 *   sign-in likewise 201 or 503; `/healthz` and `/readyz` stay 200, `/readyz` saying `degraded`;
 * - once Redis is back it is empty: a session from before is unknown (401 SESSION_REQUIRED,
 *   `/auth/me` unauthenticated), a new sign-in works, `/readyz` says `redis` again.
 */

const alice = DEMO_PATIENTS[0]!
const BOUND_MS = 1500
type Phase = 'up' | 'down' | 'back'

t.test('Redis killed and restarted under load', async (t) => {
  const { lines, stream } = captureLogs()
  const redis = await startRedis(t)
  const { app, issuer, token, auth } = await startSandboxedApp(t, { redis, upstreamTimeoutMs: 1000, email: alice.email, logStream: stream })
  const origin = await listen(app)
  const idTokens = await Promise.all(Array.from({ length: 4 }, () => issuer.sign({ email: alice.email, sub: 'sub-alice' })))
  const json = { 'content-type': 'application/json' }

  const kinds: Array<[string, () => CallOptions]> = [
    ['list', () => ({ path: '/appointments', headers: auth })],
    ['me', () => ({ path: '/auth/me', headers: auth })],
    ['cancel', () => ({ method: 'POST', path: `/appointments/${randomUUID()}/cancel`, headers: { ...auth, ...json }, body: '{}' })],
    ['sign-in', () => ({ method: 'POST', path: '/auth/session', headers: json, body: JSON.stringify({ idToken: idTokens[Math.floor(Math.random() * idTokens.length)] }) })],
    ['readyz', () => ({ path: '/readyz' })],
    ['healthz', () => ({ path: '/healthz' })]
  ]
  let phase: Phase = 'up'
  const load = { running: true }
  /** `phase` when the request started, `ended` when its answer came: a request may span a change. */
  const answers: Array<{ label: string, phase: Phase, ended: Phase, answer: Answer }> = []
  const lost: string[] = []

  async function worker (offset: number): Promise<void> {
    for (let i = offset; load.running; i++) {
      const [label, options] = kinds[i % kinds.length]!
      const at = phase
      try {
        const answer = await call(origin, { ...options(), timeoutMs: BOUND_MS + 1500 })
        answers.push({ label, phase: at, ended: phase, answer })
      } catch (error) {
        lost.push(`${label} (${at}): ${error instanceof HangError ? 'hang' : (error as Error).message}`)
      }
    }
  }
  const workers = Array.from({ length: 4 }, (_, i) => worker(i))

  await sleep(400)
  phase = 'down'
  await redis.stop()
  await sleep(1500)
  phase = 'back'
  await redis.start()
  const backBy = Date.now() + 5000
  while (app.sharedState.mode() !== 'redis' && Date.now() < backBy) await sleep(20)
  t.equal(app.sharedState.mode(), 'redis', 'the service reconnects to Redis by itself')
  await sleep(400)
  load.running = false
  await Promise.all(workers)

  t.same(lost, [], 'every request got an answer')
  checkAnswers(t, answers.map(({ label, phase, answer }) => ({ label: `${label} (${phase})`, answer })))
  const slowest = Math.max(...answers.map(({ answer }) => answer.ms))
  t.ok(slowest < BOUND_MS, `no request waited on Redis: slowest ${Math.round(slowest)} ms (bound ${BOUND_MS} ms)`)

  const allowed: Record<Phase, Record<string, string[]>> = {
    up: { list: ['200 -'], me: ['200 -'], cancel: ['404 APPOINTMENT_NOT_FOUND'], 'sign-in': ['201 -'], readyz: ['200 -'], healthz: ['200 -'] },
    down: {
      list: ['200 -', '503 SERVICE_UNAVAILABLE'],
      me: ['200 -', '503 SERVICE_UNAVAILABLE'],
      cancel: ['404 APPOINTMENT_NOT_FOUND', '503 SERVICE_UNAVAILABLE'],
      'sign-in': ['201 -', '503 SERVICE_UNAVAILABLE'],
      readyz: ['200 -'],
      healthz: ['200 -']
    },
    back: {
      // Redis came back empty: the old session is unknown once it answers again.
      list: ['200 -', '503 SERVICE_UNAVAILABLE', '401 SESSION_REQUIRED'],
      me: ['200 -', '503 SERVICE_UNAVAILABLE'],
      cancel: ['404 APPOINTMENT_NOT_FOUND', '503 SERVICE_UNAVAILABLE', '401 SESSION_REQUIRED'],
      'sign-in': ['201 -', '503 SERVICE_UNAVAILABLE'],
      readyz: ['200 -'],
      healthz: ['200 -']
    }
  }
  const unexpected = new Set<string>()
  for (const { label, phase, ended, answer } of answers) {
    const ok = [...allowed[phase][label] ?? [], ...allowed[ended][label] ?? []]
    if (!ok.includes(outcome(answer))) unexpected.add(`${label} (${phase}${ended === phase ? '' : ` to ${ended}`}) → ${outcome(answer)}`)
  }
  t.same([...unexpected], [], 'each route answers what its phase allows')

  const down = answers.filter((entry) => entry.phase === 'down')
  t.ok(down.length >= 20, `load continued through the outage (${down.length} answers)`)
  const unavailable = down.filter(({ answer }) => outcome(answer) === '503 SERVICE_UNAVAILABLE')
  t.ok(unavailable.length > 0, 'session lookups answer 503 SERVICE_UNAVAILABLE while Redis is down')
  t.ok(unavailable.every(({ answer }) => Number(answer.headers['retry-after']) >= 1), 'with Retry-After')
  const states = new Set(down.filter(({ label }) => label === 'readyz').map(({ answer }) => (JSON.parse(answer.body) as { data: { sharedState: string } }).data.sharedState))
  t.ok(states.has('degraded'), `/readyz stays 200 and reports degraded (${[...states].join(', ')})`)

  // After: the old session is gone with the old Redis; a new sign-in works and is used.
  const old = await call(origin, { path: '/appointments', headers: auth })
  t.equal(outcome(old), '401 SESSION_REQUIRED', 'a session held by the lost Redis is unknown')
  const fresh = await call(origin, { method: 'POST', path: '/auth/session', headers: json, body: JSON.stringify({ idToken: await issuer.sign({ email: alice.email, sub: 'sub-alice' }) }) })
  t.equal(fresh.status, 201, 'a new sign-in works')
  const freshToken = (JSON.parse(fresh.body) as { data: { token: string } }).data.token
  const list = await call(origin, { path: '/appointments', headers: { authorization: `Bearer ${freshToken}` } })
  t.equal(outcome(list), '200 -', 'and its session serves')
  const ready = await call(origin, { path: '/readyz' })
  t.match(JSON.parse(ready.body), { data: { sharedState: 'redis' } })

  // An outage of a few seconds under load: each warning or error said once, not once per request
  // (the shared state's, the limits', the session store's 503...), with the count left out. A lost
  // Idempotency-Key record write is told once per error type (a bug is not hidden behind the
  // outage's line), so its type is part of what must not repeat.
  const byMessage = new Map<string, number>()
  for (const line of lines.join('').split('\n').filter((text) => text !== '').map((text) => JSON.parse(text) as { level: number, msg: string, err?: { type?: string } })) {
    const said = line.msg === 'idempotency store write failed' ? `${line.msg} (${line.err?.type})` : line.msg
    if (line.level >= 40) byMessage.set(said, (byMessage.get(said) ?? 0) + 1)
  }
  t.ok(byMessage.size > 0, `the outage was told: ${[...byMessage.keys()].join('; ')}`)
  t.same([...byMessage].filter(([, count]) => count > 1), [], 'no warning repeated per request')

  const tokens = [token, freshToken, ...answers
    .filter(({ label, answer }) => label === 'sign-in' && answer.status === 201)
    .map(({ answer }) => (JSON.parse(answer.body) as { data: { token: string } }).data.token)]
  scanLogs(t, lines, { 'API key': SANDBOX_KEY, 'session token': tokens, 'ID token': idTokens, email: alice.email })
})

import t, { type Test } from 'tap'
import { performance } from 'node:perf_hooks'
import { once } from 'node:events'
import { createServer as createHttpServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { startRedis, redisClient } from '../helpers/redis.js'
import { startSandbox, SANDBOX_KEY } from '../helpers/sandbox.js'
import { ApiError } from '../../src/errors.js'
import { createMemoryBudget, createOrgBudget, type BudgetStore } from '../../src/limits/org-budget.js'
import { createMemoryCooldown, createRedisCooldown, type CooldownStore } from '../../src/limits/cooldown.js'
import { createUpstreamGate, type UpstreamGate } from '../../src/limits/upstream-gate.js'
import { createCare360Client, UpstreamError } from '../../src/care360/client.js'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'
import { maxInAnyWindow, sharedStateOn, silentLog, steppedWallClock, strictFallbackOn, uniqueName } from './fixtures/support.js'
import { createStoreFallback, type StoreFallback } from '../../src/limits/fallback.js'

const redis = await startRedis(t)

async function refusal (t: Test, gate: UpstreamGate): Promise<ApiError> {
  // A memory gate refuses synchronously, a Redis one by rejecting: either way it is a refusal.
  const error = await Promise.resolve().then(() => gate.acquire('cancel')).then(() => null, (caught: unknown) => caught)
  t.ok(error instanceof ApiError, 'refused with an ApiError')
  const apiError = error as ApiError
  t.equal(apiError.statusCode, 429)
  t.equal(apiError.code, 'UPSTREAM_RATE_LIMITED')
  return apiError
}

t.test('the budget: admits its count, then 429 with the wait until the next admission', async (t) => {
  let now = 0
  const gate = createUpstreamGate({ budget: createMemoryBudget({ count: 2, windowMs: 10_000, now: () => now }), cooldown: createMemoryCooldown({ now: () => now }), now: () => now })
  await gate.acquire('list')
  now = 2000
  await gate.acquire('cancel')
  const error = await refusal(t, gate)
  t.same(error.headers, { 'retry-after': '9' }, 'ceil((0 + 10 000 + 100 + 1 - 2000) / 1000), with the 1% guard')
  now = 10_101
  await gate.acquire('cancel')
})

t.test("the upstream's 429: a cooldown without upstream calls, and one decrease per episode", async (t) => {
  let now = 0
  const memory = createMemoryBudget({ count: 4, windowMs: 60_000, now: () => now })
  let checks = 0
  const cooldown = createMemoryCooldown({ now: () => now })
  // A counting view of a real store (the budget checks the cooldown as it admits): shows that a
  // known cooldown is not asked for again.
  const budget: BudgetStore = { take: async (check) => { checks += 1; return memory.take(check) }, decrease: memory.decrease, remaining: memory.remaining }
  const started: number[] = []
  const gate = createUpstreamGate({ budget, cooldown, now: () => now, random: () => 0.5, cooldownStarted: (ms) => { started.push(ms) } })
  await gate.acquire('list')
  t.equal(await gate.onRateLimited(null), 1000, 'no Retry-After: the first backoff')
  t.equal(await gate.onRateLimited(3000), 3000, 'an in-flight 429 with a longer Retry-After extends it')
  t.equal(await gate.onRateLimited(null), 3000, 'and a backoff never shortens it')
  t.same(started, [1000], 'one episode begun, whatever the 429s in flight')
  const before = checks
  t.same((await refusal(t, gate)).headers, { 'retry-after': '3' })
  now = 2500
  t.same((await refusal(t, gate)).headers, { 'retry-after': '1' })
  t.equal(checks, before, 'answered from the local copy')
  now = 3000
  // Halved once (4 -> 2), not once per 429: one was taken before, one is left.
  await gate.acquire('cancel')
  t.same(await budget.take(), { ok: false, retryAfterMs: 57_601 })
})

t.test("the upstream's Retry-After is clamped to [1 s, 10 min]", async (t) => {
  const gate = createUpstreamGate({ budget: createMemoryBudget({ count: 1, windowMs: 1000 }), cooldown: createMemoryCooldown() })
  t.equal(await gate.onRateLimited(5), 1000)
  t.equal(await gate.onRateLimited(86_400_000), 600_000)
})

t.test('the cooldown the gate remembers is neither ended early nor stretched by a wall clock step (NTP)', async (t) => {
  // A store that no longer shows the cooldown, as a Redis outage hides the shared one: only the
  // gate's own memory of it stops the calls.
  const forgetful: CooldownStore = {
    remaining: () => 0,
    check: { key: null, memory: () => 0 },
    trip: () => ({ remainingMs: 5000, fresh: false }),
    extend: () => 0
  }
  const wall = steppedWallClock(t)
  const gate = createUpstreamGate({ budget: createMemoryBudget({ count: 100, windowMs: 60_000 }), cooldown: forgetful })
  t.equal(await gate.onRateLimited(5000), 5000)
  wall.step(3_600_000)
  t.same((await refusal(t, gate)).headers, { 'retry-after': '5' }, 'no upstream call while the upstream still limits us')
  wall.step(-3_600_000)
  t.same((await refusal(t, gate)).headers, { 'retry-after': '5' }, 'not an hour longer')
  t.ok(gate.coolingMs() > 4000 && gate.coolingMs() <= 5000)
})

t.test('redis: one replica hears the 429, the others stop at once and resume after it', async (t) => {
  const tag = uniqueName('gate')
  const gates = await Promise.all([1, 2].map(async () => {
    const fallback = await strictFallbackOn(t, redis.url)
    return createUpstreamGate({ budget: createOrgBudget({ count: 100, windowMs: 60_000, replicas: 2, fallback, tag }), cooldown: createRedisCooldown({ fallback, tag }) })
  }))
  const [a, b] = gates as [UpstreamGate, UpstreamGate]
  await b.acquire('list')
  t.equal(await a.onRateLimited(1000), 1000)
  t.same((await refusal(t, b)).headers, { 'retry-after': '1' }, 'the other replica stops without an upstream call')
  await sleep(1050)
  await b.acquire('list')
  await a.acquire('list')
})

t.test('redis: a replica whose stores are paused after a failed command still sees the cooldown another replica began', async (t) => {
  const tag = uniqueName('paused')
  const first = await strictFallbackOn(t, redis.url)
  const state = await sharedStateOn(t, redis.url)
  const paused = createStoreFallback({ sharedState: state, log: silentLog })
  const gateOn = (fallback: StoreFallback): UpstreamGate => createUpstreamGate({ budget: createOrgBudget({ count: 100, windowMs: 60_000, replicas: 2, fallback, tag }), cooldown: createRedisCooldown({ fallback, tag }) })
  const [a, b] = [gateOn(first), gateOn(paused)]
  t.equal(await a.onRateLimited(5000), 5000)
  // A command of B's failed (a timeout, an OOM): its stores leave Redis alone for a second and
  // count in memory, where B never heard of A's 429.
  state.degradeFor(1000)
  t.equal(state.mode(), 'degraded')
  t.same((await refusal(t, b)).headers, { 'retry-after': '5' }, 'no upstream call: the shared cooldown is still read')
  t.ok(b.coolingMs() > 4000, 'and remembered here from then on')
  // Paused and no cooldown anywhere: this replica's share of the budget, in memory.
  const quiet = uniqueName('quiet')
  const other = createUpstreamGate({ budget: createOrgBudget({ count: 2, windowMs: 60_000, replicas: 2, fallback: paused, tag: quiet }), cooldown: createRedisCooldown({ fallback: paused, tag: quiet }) })
  await other.acquire('list')
  t.equal((await refusal(t, other)).code, 'UPSTREAM_RATE_LIMITED', 'a share of 1 of 2: the second call waits')
  // That read failing too (Redis stalled): the twin decides, the pause goes on, and the calls of
  // that pause are not asked to wait out a command timeout each.
  // Its pause is read on a clock the test can hold at one instant (the real one otherwise): a
  // timer waking late on a loaded machine must not carry the check past the extended pause too.
  let heldAt: number | null = null
  const stalled = await sharedStateOn(t, redis.url, 100, () => heldAt ?? performance.now())
  const stalledGate = gateOn(createStoreFallback({ sharedState: stalled, log: silentLog }))
  const admin = redisClient(redis.url)
  t.teardown(() => { admin.disconnect() })
  await admin.call('CLIENT', 'PAUSE', '1500', 'ALL')
  stalled.degradeFor(1000)
  const pausedAt = performance.now()
  await Promise.all([stalledGate.acquire('list'), stalledGate.acquire('list')])
  t.pass('admitted from its share while the cooldown cannot be read (this replica knows of none)')
  const next = performance.now()
  await stalledGate.acquire('list')
  t.ok(performance.now() - next < 50, `the next call of the pause is not sent to the stalled Redis (${Math.round(performance.now() - next)} ms)`)
  // The read failed no sooner than its 100 ms bound after pausedAt: it moved the pause's end from
  // pausedAt + 1000 to at least pausedAt + 1100. Checked 50 ms past the first end, on the held clock.
  heldAt = pausedAt + 1050
  t.equal(stalled.mode(), 'degraded', 'past the first pause: the failed read extended it')
  heldAt = null
  await sleep(Math.max(0, pausedAt + 1550 - performance.now()))
  // A pause begun by a command that timed out asks the stalled Redis nothing either.
  const timedOut = await sharedStateOn(t, redis.url, 100)
  const timedOutGate = gateOn(createStoreFallback({ sharedState: timedOut, log: silentLog }))
  await admin.call('CLIENT', 'PAUSE', '800', 'ALL')
  await timedOutGate.acquire('list')
  t.equal(timedOut.mode(), 'degraded', 'the admission timed out: paused')
  const after = performance.now()
  await timedOutGate.acquire('list')
  t.ok(performance.now() - after < 50, `the next call does not wait on the stalled Redis (${Math.round(performance.now() - after)} ms)`)
  await sleep(800)
})

t.test('end to end: three replicas driven at three times the budget never get a 429 from the upstream', async (t) => {
  // A window long enough that the arrival jitter of a loaded test machine stays well inside the
  // quota's margin (the production defaults, 450 of 500 per 60 s, leave far more).
  const budget = { count: 10, windowMs: 2000 }
  // The sandbox counts in its own sliding window, a little above the budget.
  const sandbox = await startSandbox(t, { quota: { count: 12, windowMs: 2000 } })
  const tag = uniqueName('e2e')
  const clients = await Promise.all([1, 2, 3].map(async () => {
    const fallback = await strictFallbackOn(t, redis.url)
    // The guard covers the arrival jitter of this (loaded, shared) test machine: calls admitted
    // a window apart must not arrive closer than that (see org-budget.ts).
    const gate = createUpstreamGate({ budget: createOrgBudget({ ...budget, guardMs: 500, replicas: 3, fallback, tag }), cooldown: createRedisCooldown({ fallback, tag }) })
    const client = createCare360Client({ baseUrl: sandbox.url, apiKey: SANDBOX_KEY, timeoutMs: 2000, gate })
    t.teardown(() => client.close())
    return client
  }))
  const email = (DEMO_PATIENTS[0] as { email: string }).email
  const outcomes = { ok: 0, budget: 0, upstream429: 0, other: 0 }
  const end = performance.now() + 3000
  // 15 calls per second in all (three times 10 per 2 s): every 200 ms each replica fires one.
  await Promise.all(clients.map(async (client, replica) => {
    let n = 0
    while (performance.now() < end) {
      n += 1
      const call = client.fetchAppointments(email, { requestId: `r${replica}-${n}` }).then(
        () => { outcomes.ok += 1 },
        (error: unknown) => {
          if (error instanceof UpstreamError && error.upstreamStatus === 429) outcomes.upstream429 += 1
          else if (error instanceof ApiError && error.code === 'UPSTREAM_RATE_LIMITED') outcomes.budget += 1
          else outcomes.other += 1
        })
      await Promise.all([call, sleep(200)])
    }
  }))
  t.equal(outcomes.upstream429, 0, 'the upstream never had to answer 429')
  t.equal(outcomes.other, 0)
  t.ok(outcomes.budget > 0, 'the budget refused the excess')
  t.ok(outcomes.ok >= 10 && outcomes.ok <= 20, `admitted ${outcomes.ok} in 3 s`)
  const seen = maxInAnyWindow(sandbox.control.calls.map((call) => call.at), budget.windowMs)
  t.ok(seen <= 12, `the upstream saw at most ${seen} calls in any window`)
})

t.test('a call waiting for a connection is admitted once it has one: the upstream never sees more than the budget in any window', async (t) => {
  // Two connections, the first two answers 600 ms slow: two calls wait for a socket meanwhile.
  // Admitted at once and sent when a socket freed, they would reach the upstream 600 ms after
  // their admission, and a second batch admitted a window after the first would land in the same
  // window as them: six calls in one window of a budget of four.
  const arrivals: number[] = []
  let slow = 2
  const upstream = createHttpServer((request, response) => {
    arrivals.push(performance.now())
    request.resume()
    const answer = (): void => { response.setHeader('content-type', 'application/json'); response.end(JSON.stringify({ status: 200, success: true, data: [] })) }
    if (slow-- > 0) setTimeout(answer, 600)
    else answer()
  })
  upstream.listen(0, '127.0.0.1')
  await once(upstream, 'listening')
  t.teardown(() => { upstream.closeAllConnections(); upstream.close() })
  // The guard takes up the lateness of a loaded test machine (calls admitted a window apart must
  // not arrive closer than that); it is far below the 600 ms a queued call would wait.
  const budget = { count: 4, windowMs: 1000, guardMs: 250 }
  const gate = createUpstreamGate({ budget: createMemoryBudget(budget), cooldown: createMemoryCooldown({}) })
  const client = createCare360Client({ baseUrl: `http://127.0.0.1:${(upstream.address() as AddressInfo).port}`, apiKey: SANDBOX_KEY, timeoutMs: 3000, gate, connections: 2 })
  t.teardown(() => client.close())
  const email = (DEMO_PATIENTS[0] as { email: string }).email
  const outcome = async (n: number): Promise<string> => await client.fetchAppointments(email, { requestId: `r${n}` }).then(() => 'ok', (error: ApiError) => error.code)
  const first = Array.from({ length: 4 }, async (_, n) => await outcome(n))
  // The first batch's admissions have left the budget's span (window and guard) by then.
  await sleep(budget.windowMs + budget.guardMs + 50)
  const second = await Promise.all(Array.from({ length: 4 }, async (_, n) => await outcome(4 + n)))
  t.same(await Promise.all(first), ['ok', 'ok', 'ok', 'ok'])
  t.same(second, ['ok', 'ok', 'UPSTREAM_RATE_LIMITED', 'UPSTREAM_RATE_LIMITED'], 'the two calls sent late still count in the window')
  const seen = maxInAnyWindow(arrivals, budget.windowMs)
  t.ok(seen <= budget.count, `the upstream saw at most ${seen} calls in any window of ${budget.windowMs} ms (budget ${budget.count})`)
})

t.test('a call a known cooldown stops is refused at once, not after waiting for a connection', async (t) => {
  const upstream = createHttpServer((request, response) => {
    request.resume()
    setTimeout(() => { response.setHeader('content-type', 'application/json'); response.end(JSON.stringify({ status: 200, success: true, data: [] })) }, 600)
  })
  upstream.listen(0, '127.0.0.1')
  await once(upstream, 'listening')
  t.teardown(() => { upstream.closeAllConnections(); upstream.close() })
  const gate = createUpstreamGate({ budget: createMemoryBudget({ count: 100, windowMs: 60_000 }), cooldown: createMemoryCooldown({}) })
  const client = createCare360Client({ baseUrl: `http://127.0.0.1:${(upstream.address() as AddressInfo).port}`, apiKey: SANDBOX_KEY, timeoutMs: 3000, gate, connections: 1 })
  t.teardown(() => client.close())
  const email = (DEMO_PATIENTS[0] as { email: string }).email
  const slow = client.fetchAppointments(email, { requestId: 'slow' })
  await gate.onRateLimited(5000)
  const started = performance.now()
  await t.rejects(client.fetchAppointments(email, { requestId: 'next' }), { statusCode: 429, code: 'UPSTREAM_RATE_LIMITED' })
  t.ok(performance.now() - started < 100, `at once (${Math.round(performance.now() - started)} ms), while the only connection is busy`)
  await slow
})

t.test('the recorder hears each decision of the cooldown and the budget', async (t) => {
  let now = 0
  const decisions: Array<[string, boolean]> = []
  const gate = createUpstreamGate({
    budget: createMemoryBudget({ count: 2, windowMs: 10_000, now: () => now }),
    cooldown: createMemoryCooldown({ now: () => now }),
    now: () => now,
    record: {
      decision (scope, limited) { decisions.push([scope, limited]) }
    }
  })
  await gate.acquire('list')
  await gate.acquire('cancel')
  await refusal(t, gate)
  t.same(decisions, [['cooldown', false], ['org_budget', false], ['cooldown', false], ['org_budget', false], ['cooldown', false], ['org_budget', true]])
  decisions.length = 0
  now = 20_000
  await gate.onRateLimited(5000)
  await refusal(t, gate)
  t.same(decisions, [['cooldown', true]], 'stopped by the cooldown this process knows, the budget is not asked')
})

t.test('a cooldown the budget reports is remembered: the next calls are refused without asking the store', async (t) => {
  let now = 0
  let takes = 0
  const budget: BudgetStore = {
    // The shared cooldown seen in the budget's step (one Redis round trip): 30 s, then nothing.
    take: async () => { takes += 1; return takes === 1 ? { ok: false, coolingMs: 30_000 } : { ok: true, remaining: 1 } },
    decrease: async () => {},
    remaining: async () => 1
  }
  const gate = createUpstreamGate({ budget, cooldown: createMemoryCooldown({ now: () => now }), now: () => now })
  t.same((await refusal(t, gate)).headers, { 'retry-after': '30' }, 'refused by the cooldown the store reported')
  t.equal(gate.coolingMs(), 30_000, 'and remembered')
  now = 10_000
  t.same((await refusal(t, gate)).headers, { 'retry-after': '20' }, 'still refused 10 s later')
  t.equal(takes, 1, 'from the local copy, without asking the store again')
  t.equal(gate.coolingMs(), 20_000)
  now = 30_000
  await gate.acquire('list')
  t.equal(takes, 2, 'once it ended, the store is asked again')
})

t.test('a shorter cooldown heard later never shortens the one the gate remembers', async (t) => {
  let now = 0
  const trips = [30_000, 1000]
  const cooldown: CooldownStore = {
    remaining: () => 0,
    check: { key: null, memory: () => 0 },
    trip: () => ({ remainingMs: trips.shift() as number, fresh: false }),
    extend: (remainingMs) => remainingMs
  }
  const gate = createUpstreamGate({ budget: createMemoryBudget({ count: 100, windowMs: 60_000, now: () => now }), cooldown, now: () => now })
  t.equal(await gate.onRateLimited(30_000), 30_000)
  now = 1000
  t.equal(await gate.onRateLimited(null), 29_000, 'the later 429 answers the cooldown still running')
  t.equal(gate.coolingMs(), 29_000, 'not the 1 s the store answered the second time')
  now = 5000
  t.same((await refusal(t, gate)).headers, { 'retry-after': '25' }, 'still refused after the shorter one would have ended')
})

import t, { type Test } from 'tap'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis } from 'ioredis'
import { dataAgeMs, startRedis, redisClient } from '../helpers/redis.js'
import { createMemoryBudget, createOrgBudget, createRedisBudget, REPLAY_BATCH, type BudgetOptions, type BudgetStore } from '../../src/limits/org-budget.js'
import { createMemoryCooldown, createRedisCooldown, type CooldownStore } from '../../src/limits/cooldown.js'
import { createStoreFallback, type StoreFallback } from '../../src/limits/fallback.js'
import { fallbackOn, maxCertainlyInOneWindow, sharedStateOn, silentLog, strictFallbackOn, uniqueName, waitFor } from './fixtures/support.js'

const redis = await startRedis(t)

type Make = (t: Test, options: BudgetOptions) => Promise<BudgetStore>

const kinds: Array<[string, Make]> = [
  ['memory', async (_t, options) => createMemoryBudget(options)],
  ['redis', async (t, options) => createRedisBudget({ ...options, fallback: await strictFallbackOn(t, redis.url), tag: uniqueName('budget'), memory: createMemoryBudget(options) })]
]

async function takeMany (budget: BudgetStore, n: number): Promise<number> {
  let admitted = 0
  for (let i = 0; i < n; i++) if ((await budget.take()).ok) admitted += 1
  return admitted
}

// One suite, both implementations.
for (const [kind, make] of kinds) {
  t.test(`${kind}: admits the count, then says when the next admission comes`, async (t) => {
    const budget = await make(t, { count: 3, windowMs: 500 })
    t.same(await budget.take(), { ok: true, remaining: 2 })
    t.same(await budget.take(), { ok: true, remaining: 1 })
    t.same(await budget.take(), { ok: true, remaining: 0 })
    const denied = await budget.take()
    t.equal(denied.ok, false)
    t.ok('retryAfterMs' in denied && denied.retryAfterMs > 0 && denied.retryAfterMs <= 506, `waits for the oldest to leave (${JSON.stringify(denied)})`)
  })

  t.test(`${kind}: the window slides (no fixed boundary to burst across)`, async (t) => {
    const budget = await make(t, { count: 3, windowMs: 800 })
    t.equal(await takeMany(budget, 2), 2)
    await sleep(400)
    t.equal(await takeMany(budget, 2), 1, 'one left in the window')
    await sleep(450)
    // The first two left; the one taken at ~400 ms is still in the window.
    t.equal(await takeMany(budget, 3), 2)
  })

  t.test(`${kind}: a decrease halves the limit, which then climbs back`, async (t) => {
    // One more admission per 500 ms of recovery.
    const budget = await make(t, { count: 8, windowMs: 60_000, recoverMs: 4000 })
    await budget.decrease()
    t.equal(await takeMany(budget, 6), 4, 'half of 8')
    const denied = await budget.take()
    t.equal(denied.ok, false)
    // Far sooner than the window.
    t.ok('retryAfterMs' in denied && denied.retryAfterMs <= 500, `waits for the limit to grow (${JSON.stringify(denied)})`)
    await sleep(600)
    const grown = await takeMany(budget, 4)
    t.ok(grown >= 1 && grown <= 2, `4 + floor(elapsed * 8 / 4000): ${grown} more after ~600 ms`)
    await budget.decrease()
    t.equal(await takeMany(budget, 2), 0, 'halved again from the current limit (5 -> 2), which is spent')
  })

  t.test(`${kind}: what is left is read without taking, and refills as the window slides`, async (t) => {
    const budget = await make(t, { count: 3, windowMs: 400, recoverMs: 60_000 })
    t.equal(await budget.remaining(), 3, 'a fresh budget')
    t.equal(await takeMany(budget, 2), 2)
    t.equal(await budget.remaining(), 1, 'two taken')
    t.equal(await budget.remaining(), 1, 'reading took nothing')
    t.equal(await takeMany(budget, 2), 1)
    t.equal(await budget.remaining(), 0, 'spent')
    await budget.decrease()
    await sleep(450)
    // The window is empty again, the limit halved (3 -> 1) and barely recovered.
    t.equal(await budget.remaining(), 1, 'refilled to the decreased limit, with no call made')
    t.same(await budget.take(), { ok: true, remaining: 0 }, 'and take agrees')
  })

  t.test(`${kind}: never below one`, async (t) => {
    const budget = await make(t, { count: 1, windowMs: 10_000 })
    await budget.decrease()
    await budget.decrease()
    t.equal(await takeMany(budget, 2), 1)
  })

  t.test(`${kind}: fully recovered, the decrease is forgotten`, async (t) => {
    const budget = await make(t, { count: 4, windowMs: 10_000, recoverMs: 40 })
    await budget.decrease()
    await sleep(80)
    t.equal(await takeMany(budget, 5), 4)
  })
}

type MakeWithCooldown = (t: Test, options: BudgetOptions) => Promise<{ budget: BudgetStore, cooldown: CooldownStore }>

const withCooldown: Array<[string, MakeWithCooldown]> = [
  ['memory', async (_t, options) => ({ budget: createMemoryBudget(options), cooldown: createMemoryCooldown() })],
  ['redis', async (t, options) => {
    const fallback = await strictFallbackOn(t, redis.url)
    const tag = uniqueName('budget')
    return { budget: createRedisBudget({ ...options, fallback, tag, memory: createMemoryBudget(options) }), cooldown: createRedisCooldown({ fallback, tag }) }
  }]
]

for (const [kind, make] of withCooldown) {
  t.test(`${kind}: with the cooldown checked, a running cooldown refuses first and spends nothing`, async (t) => {
    const { budget, cooldown } = await make(t, { count: 3, windowMs: 60_000 })
    t.same(await budget.take(cooldown.check), { ok: true, remaining: 2 })
    await cooldown.trip(2000, 0)
    const cooling = await budget.take(cooldown.check)
    t.ok('coolingMs' in cooling && cooling.coolingMs > 1500 && cooling.coolingMs <= 2000, `the cooldown's time left (${JSON.stringify(cooling)})`)
    const again = await budget.take(cooldown.check)
    t.ok('coolingMs' in again && again.coolingMs > 0, 'and again, while it runs')
    t.same(await budget.take(), { ok: true, remaining: 1 }, 'the refused calls drew nothing from the budget')
  })
}

t.test('redis: a cooldown held only in this process is checked too', async (t) => {
  const options = { count: 3, windowMs: 60_000 }
  const budget = createRedisBudget({ ...options, fallback: await strictFallbackOn(t, redis.url), tag: uniqueName('budget'), memory: createMemoryBudget(options) })
  // A clock of its own: on the real one a millisecond can pass between the trip and the check.
  const cooldown = createMemoryCooldown({ now: () => 5_000 })
  t.same(await budget.take(cooldown.check), { ok: true, remaining: 2 })
  cooldown.trip(2000, 0)
  t.same(await budget.take(cooldown.check), { ok: false, coolingMs: 2000 })
  t.same(await budget.take(), { ok: true, remaining: 1 }, 'nothing drawn')
})

t.test('paused after a failed command: calls at the same time share one read of the shared cooldown', async (t) => {
  const options = { count: 10, windowMs: 60_000 }
  const paused: StoreFallback = {
    redisConfigured: true,
    redisFor: () => 0,
    run: async (_viaRedis, inMemory, whilePaused) => whilePaused === undefined ? inMemory() : await whilePaused({} as Redis)
  }
  const budget = createRedisBudget({ ...options, fallback: paused, tag: uniqueName('paused'), memory: createMemoryBudget(options) })
  let reads = 0
  const check = { key: 'shared-cooldown', memory: () => 0, shared: async () => { reads += 1; await sleep(20); return 0 } }
  const decisions = await Promise.all(Array.from({ length: 5 }, async () => await budget.take(check)))
  t.ok(decisions.every((decision) => decision.ok), 'no cooldown: admitted by the twin')
  t.equal(reads, 1, 'one read for the five')
  await budget.take(check)
  t.equal(reads, 2, 'a later call reads again')
})

t.test('memory: the wait is exactly until the oldest entry leaves the closed span', async (t) => {
  let now = 1000
  const budget = createMemoryBudget({ count: 2, windowMs: 500, guardMs: 20, now: () => now })
  budget.take()
  now = 1100
  budget.take()
  now = 1200
  t.same(budget.take(), { ok: false, retryAfterMs: 321 }, 'the entry at 1000 counts until 1520 inclusive (window + guard)')
  now = 1520
  t.equal(budget.take().ok, false)
  now = 1521
  t.equal(budget.take().ok, true)
})

t.test('memory: after a decrease, the wait is the sooner of the oldest entry leaving and the limit growing', async (t) => {
  for (const [recoverMs, expected, which] of [[100_000, 401, 'the oldest entry leaves first'], [1000, 150, 'the limit grows first']] as const) {
    let now = 0
    const budget = createMemoryBudget({ count: 4, windowMs: 1000, guardMs: 0, recoverMs, now: () => now })
    budget.take()
    now = 500
    budget.decrease()
    t.match(budget.take(), { ok: true }, 'halved to 2: the second call')
    now = 600
    t.same(budget.take(), { ok: false, retryAfterMs: expected }, which)
  }
})

t.test('memory: the log keeps its order when it grows while entries have left its front', async (t) => {
  let now = 0
  const budget = createMemoryBudget({ count: 100, windowMs: 10_000, guardMs: 0, now: () => now })
  for (let i = 0; i < 40; i++) { now = i; budget.take() }
  // Entries 0..34 leave; 35..39 stay at the front of a ring that has moved on, and it grows
  // past its first 64 places while wrapped.
  now = 10_035
  for (let i = 0; i < 95; i++) t.equal(budget.take().ok, true)
  t.same(budget.take(), { ok: false, retryAfterMs: 1 }, 'full: the oldest (35) leaves at 10 036')
  budget.decrease()
  t.same(budget.take(), { ok: false, retryAfterMs: 10_001 }, 'halved to 50: the 51st oldest (10 035) must leave first')
})

t.test('memory: a clock that steps back keeps the log sorted, and a long log is compacted', async (t) => {
  let now = 10_000
  const budget = createMemoryBudget({ count: 2000, windowMs: 100, now: () => now })
  for (let i = 0; i < 1500; i++) budget.take()
  now = 9000
  t.equal(budget.take().ok, true, 'counted at the newest time seen')
  now = 10_200
  for (let i = 0; i < 5; i++) t.equal(budget.take().ok, true)
})

t.test('redis: exact admission from three clients at once', async (t) => {
  const tag = uniqueName('exact')
  const options = { count: 50, windowMs: 60_000 }
  const budgets = await Promise.all([1, 2, 3].map(async () => createRedisBudget({ ...options, fallback: await strictFallbackOn(t, redis.url), tag, memory: createMemoryBudget(options) })))
  const decisions = await Promise.all(Array.from({ length: 300 }, async (_, i) => await (budgets[i % 3] as BudgetStore).take()))
  t.equal(decisions.filter((decision) => decision.ok).length, 50, 'admitted == count')
})

t.test('redis: no interval of the window length admits more than the count, under bursts from three instances', async (t) => {
  const tag = uniqueName('bound')
  const options = { count: 10, windowMs: 300 }
  const budgets = await Promise.all([1, 2, 3].map(async () => createRedisBudget({ ...options, fallback: await strictFallbackOn(t, redis.url), tag, memory: createMemoryBudget(options) })))
  const admitted: Array<{ from: number, to: number }> = []
  const end = performance.now() + 1500
  await Promise.all(budgets.map(async (budget, instance) => {
    // Bursts of 10 concurrent calls, at intervals that do not divide the window.
    while (performance.now() < end) {
      await Promise.all(Array.from({ length: 10 }, async () => {
        const from = performance.now()
        if ((await budget.take()).ok) admitted.push({ from, to: performance.now() })
      }))
      await sleep(17 + instance * 7)
    }
  }))
  const max = maxCertainlyInOneWindow(admitted, options.windowMs)
  t.ok(max <= options.count, `at most the count in any window (${max})`)
  // And the check can see a violation: a fixed window's boundary burst would be caught.
  const boundaryBurst = [...Array.from({ length: 10 }, () => ({ from: 290, to: 295 })), ...Array.from({ length: 10 }, () => ({ from: 301, to: 305 }))]
  t.equal(maxCertainlyInOneWindow(boundaryBurst, options.windowMs), 20)
  t.ok(admitted.length >= 40, `the budget is used, not starved (${admitted.length} in 1.5 s)`)
})

t.test('redis: every key carries the hash tag', async (t) => {
  const tag = uniqueName('tagged')
  const budget = createRedisBudget({ count: 2, windowMs: 1000, fallback: await strictFallbackOn(t, redis.url), tag, memory: createMemoryBudget({ count: 2, windowMs: 1000 }) })
  await budget.take()
  await budget.decrease()
  const client = redisClient(redis.url)
  t.teardown(() => client.disconnect())
  const keys = await client.keys(`*${tag}*`)
  t.same(keys.sort(), [`{${tag}}:aimd`, `{${tag}}:log`, `{${tag}}:seq`])
})

t.test('redis: every key expires by itself: the log and its sequence after a span, the decrease once recovered', async (t) => {
  const tag = uniqueName('expiring')
  const budget = createRedisBudget({ count: 2, windowMs: 1000, guardMs: 10, recoverMs: 4000, fallback: await strictFallbackOn(t, redis.url), tag, memory: createMemoryBudget({ count: 2, windowMs: 1000 }) })
  await budget.take()
  await budget.decrease()
  const client = redisClient(redis.url)
  t.teardown(() => client.disconnect())
  for (const [name, most] of [['log', 1011], ['seq', 1011], ['aimd', 4000]] as const) {
    const ttl = await client.pttl(`{${tag}}:${name}`)
    t.ok(ttl > most - 500 && ttl <= most, `${name} expires within ${most} ms (${ttl})`)
  }
})

t.test('redis: a decrease dated ahead of Redis\'s clock (a failover to a replica whose clock is behind) holds its floor, no less', async (t) => {
  const tag = uniqueName('ahead')
  const options = { count: 10, windowMs: 60_000, recoverMs: 60_000 }
  const budget = createRedisBudget({ ...options, fallback: await strictFallbackOn(t, redis.url), tag, memory: createMemoryBudget(options) })
  const client = redisClient(redis.url)
  t.teardown(() => client.disconnect())
  const [seconds] = await client.time()
  await client.hset(`{${tag}}:aimd`, 'floor', '2', 'at', String((Number(seconds) + 60) * 1000))
  t.same(await budget.take(), { ok: true, remaining: 1 }, 'the floor of 2, not less')
  t.same(await budget.take(), { ok: true, remaining: 0 })
  t.match(await budget.take(), { ok: false, retryAfterMs: Number })
})

t.test('redis: a decrease recovered past the count, its state not yet expired, never raises the limit above the count', async (t) => {
  const tag = uniqueName('recovered')
  const options = { count: 4, windowMs: 60_000, recoverMs: 60_000 }
  // Long back on Redis: no twin check, so Redis's script alone decides.
  const fallback = { ...await strictFallbackOn(t, redis.url), redisFor: () => Number.POSITIVE_INFINITY }
  const budget = createRedisBudget({ ...options, fallback, tag, memory: createMemoryBudget(options) })
  const client = redisClient(redis.url)
  t.teardown(() => client.disconnect())
  const [seconds] = await client.time()
  // Halved to 2 fifty seconds ago: 2 + floor(50 000 * 4 / 60 000) = 5 by the recovery alone.
  await client.hset(`{${tag}}:aimd`, 'floor', '2', 'at', String((Number(seconds) - 50) * 1000))
  t.equal(await takeMany(budget, 6), 4, 'the count, no more')
})

t.test('outage: calls made alone at the same time on the twin\'s clock are each entered into Redis\'s log', async (t) => {
  const tag = uniqueName('same-time')
  const sharedState = await sharedStateOn(t, redis.url)
  const client = sharedState.redis as Redis
  let down = true
  const fallback: StoreFallback = {
    redisConfigured: true,
    redisFor: () => 0,
    run: async (viaRedis, inMemory) => down ? inMemory() : await viaRedis(client)
  }
  // A clock that does not move (a coarse one does the same between calls close together).
  const memory = createMemoryBudget({ count: 10, windowMs: 60_000, trackAlone: true, now: () => 5_000 })
  const budget = createRedisBudget({ count: 10, windowMs: 60_000, fallback, tag, memory })
  t.equal(await takeMany(budget, 3), 3, 'alone, all at 5 000')
  down = false
  t.same(await budget.take(), { ok: true, remaining: 6 }, 'Redis: the three and this one')
  t.equal(await logSizeOf(t, tag)(), 4, 'three members for the three calls, not one')
})

t.test('the per-process share is the count divided by the replicas, at least one', async (t) => {
  // Redis configured but unreachable: every call falls back to this process's share.
  const unreachable: StoreFallback = { redisConfigured: true, redisFor: () => 0, run: (_viaRedis, inMemory) => inMemory() }
  t.equal(await takeMany(createOrgBudget({ count: 10, windowMs: 1000, replicas: 3, fallback: unreachable }), 5), 3)
  t.equal(await takeMany(createOrgBudget({ count: 2, windowMs: 1000, replicas: 5, fallback: unreachable }), 3), 1)
  // No Redis configured and REPLICAS above 1 (several in-memory processes, the configuration
  // says): the same share, so that together they never exceed the count.
  const memoryOnly = await fallbackOn(t, null)
  t.equal(await takeMany(createOrgBudget({ count: 10, windowMs: 1000, replicas: 3, fallback: memoryOnly }), 5), 3)
  t.equal(await takeMany(createOrgBudget({ count: 10, windowMs: 1000, replicas: 1, fallback: memoryOnly }), 12), 10, 'one process: the whole count')
  const withRedis = await strictFallbackOn(t, redis.url)
  t.equal(await takeMany(createOrgBudget({ count: 10, windowMs: 1000, replicas: 3, fallback: withRedis, tag: uniqueName('share') }), 12), 10, 'the whole count while Redis answers')
})

t.test('one replica: its twin holds every call, so the count holds even when Redis loses its data', async (t) => {
  // Redis has answered without a break for far longer than a span: only the one-replica rule
  // makes the twin count the calls Redis admits.
  const fallback = { ...await strictFallbackOn(t, redis.url), redisFor: () => 24 * 60 * 60_000 }
  const tag = uniqueName('single')
  const budget = createOrgBudget({ count: 2, windowMs: 60_000, replicas: 1, fallback, tag })
  t.equal(await takeMany(budget, 2), 2, 'through Redis')
  const admin = redisClient(redis.url)
  t.teardown(() => admin.disconnect())
  // Redis forgets the budget (a flush, a failover to an empty replica).
  t.ok(await admin.del(`{${tag}}:log`, `{${tag}}:seq`, `{${tag}}:aimd`) > 0)
  t.equal(await admin.zcard(`{${tag}}:log`), 0)
  t.match(await budget.take(), { ok: false, retryAfterMs: Number }, 'refused: the twin still holds both calls')
})

// ---------------------------------------------------------------------------------------------
// Across an outage: every replica's twin counts its own calls, whichever store admitted them.

interface Replica { budget: BudgetStore, deny: () => Promise<void>, allow: () => Promise<void> }

/**
 * One replica of the service: its own Redis user (so that Redis can fail for it alone, as a
 * refused script does on a live connection), its own client, fallback and org budget.
 */
async function replicaOf (t: Test, name: string, options: { count: number, windowMs: number, replicas: number, tag: string }, commandTimeoutMs?: number): Promise<Replica> {
  const admin = redisClient(redis.url)
  t.teardown(() => admin.disconnect())
  const user = `${options.tag}-${name}`
  await admin.call('ACL', 'SETUSER', user, 'on', '>pw', '~*', '&*', '+@all')
  const url = redis.url.replace('redis://', `redis://${user}:pw@`)
  const fallback = createStoreFallback({ sharedState: await sharedStateOn(t, url, commandTimeoutMs), log: silentLog, pauseMs: 100 })
  return {
    budget: createOrgBudget({ ...options, fallback }),
    deny: async () => { await admin.call('ACL', 'SETUSER', user, '-evalsha', '-eval') },
    // Redis is tried again once the fallback's pause after the failure has passed.
    allow: async () => { await admin.call('ACL', 'SETUSER', user, '+evalsha', '+eval'); await sleep(150) }
  }
}

/** The number of entries in a budget's Redis log. */
function logSizeOf (t: Test, tag: string): () => Promise<number> {
  const admin = redisClient(redis.url)
  t.teardown(() => admin.disconnect())
  return async () => await admin.zcard(`{${tag}}:log`)
}

/** Two replicas of one budget (REPLICAS=2), and the size of its Redis log. */
async function twoReplicas (t: Test, base: string, count: number, windowMs: number): Promise<{ a: Replica, b: Replica, logSize: () => Promise<number> }> {
  const tag = uniqueName(base)
  const options = { count, windowMs, replicas: 2, tag }
  return { a: await replicaOf(t, 'a', options), b: await replicaOf(t, 'b', options), logSize: logSizeOf(t, tag) }
}

t.test('outage, one replica: Redis fails after the whole count went through it; memory admits nothing more in that span', async (t) => {
  const a = await replicaOf(t, 'a', { count: 6, windowMs: 2000, replicas: 1, tag: uniqueName('fail') })
  t.equal(await takeMany(a.budget, 6), 6, 'through Redis')
  await a.deny()
  const refused = await a.budget.take()
  t.match(refused, { ok: false, retryAfterMs: Number }, 'from memory, which counted the calls Redis admitted')
  t.equal(await takeMany(a.budget, 5), 0)
})

t.test('outage, one replica: Redis back within the span of calls admitted alone; both must admit until it passes', async (t) => {
  const a = await replicaOf(t, 'a', { count: 6, windowMs: 2000, replicas: 1, tag: uniqueName('recover') })
  await a.deny()
  t.equal(await takeMany(a.budget, 4), 4, 'alone, in memory')
  await a.allow()
  t.same(await a.budget.take(), { ok: true, remaining: 1 }, 'the calls made alone went into Redis with this one')
  t.same(await a.budget.take(), { ok: true, remaining: 0 })
  t.equal(await takeMany(a.budget, 4), 0)
  await sleep(2100)
  t.equal(await takeMany(a.budget, 7), 6, 'a span later, the whole count again')
})

t.test('outage: what is left is Redis\'s count while it answers, the replica\'s share alone, the smaller of both just after', async (t) => {
  const a = await replicaOf(t, 'a', { count: 6, windowMs: 2000, replicas: 2, tag: uniqueName('left') })
  t.equal(await takeMany(a.budget, 1), 1)
  t.equal(await a.budget.remaining(), 5, 'from Redis: the whole count, less the call')
  await a.deny()
  t.equal(await a.budget.remaining(), 2, 'alone: its share (3), less the call it made through Redis')
  await a.allow()
  t.equal(await a.budget.remaining(), 2, 'back within a span: the smaller of Redis\'s 5 and its own 2')
})

t.test('outage: a replica\'s first call after Redis returns enters the calls it made alone into Redis\'s log', async (t) => {
  const { a, b, logSize } = await twoReplicas(t, 'replay', 10, 5000)
  await a.deny()
  t.equal(await takeMany(a.budget, 3), 3, 'alone')
  await a.allow()
  t.same(await a.budget.take(), { ok: true, remaining: 1 }, 'Redis: 6 left; memory, its share of 5 less 4: 1')
  t.equal(await logSize(), 4, 'the three made alone, and this one')
  t.equal(await takeMany(b.budget, 10), 6, 'b, which never left Redis, sees them all')
})

t.test('outage, two replicas: alone, each keeps its share; back on Redis in turn, still the count in the span', async (t) => {
  const { a, b } = await twoReplicas(t, 'pair', 10, 2000)
  t.equal(await takeMany(a.budget, 2) + await takeMany(b.budget, 2), 4, 'through Redis')
  await a.deny()
  await b.deny()
  t.equal(await takeMany(a.budget, 5), 3, 'a: its share, less what it sent through Redis')
  t.equal(await takeMany(b.budget, 5), 3, 'b: likewise')
  await a.allow()
  t.equal(await takeMany(a.budget, 5), 0, 'a is back on Redis (4 of 10 there) but holds its share in memory')
  await b.allow()
  t.equal(await takeMany(b.budget, 5), 0, 'and so does b')
})

t.test('outage: a replica whose share is spent still hands its calls made alone to Redis', async (t) => {
  const { a, b, logSize } = await twoReplicas(t, 'spent', 4, 5000)
  await a.deny()
  t.equal(await takeMany(a.budget, 3), 2, 'a alone: its share')
  await a.allow()
  t.match(await a.budget.take(), { ok: false, retryAfterMs: Number }, 'refused by its share')
  t.equal(await logSize(), 2, 'yet its calls made alone are in Redis')
  t.equal(await takeMany(b.budget, 4), 2, 'b sees them')
})

t.test('outage: calls made alone are entered once, even when a script ran but its answer came too late', async (t) => {
  const tag = uniqueName('late')
  const a = await replicaOf(t, 'a', { count: 10, windowMs: 5000, replicas: 2, tag }, 100)
  const logSize = logSizeOf(t, tag)
  const admin = redisClient(redis.url)
  t.teardown(() => admin.disconnect())
  await a.deny()
  t.equal(await takeMany(a.budget, 5), 5, 'alone: the share')
  await a.allow()
  // The script waits out the pause; the replica has given up on it after 100 ms and counts alone.
  await admin.call('CLIENT', 'PAUSE', '300', 'WRITE')
  t.match(await a.budget.take(), { ok: false }, 'its share is spent: the replay goes alone, and times out')
  await sleep(450)
  t.equal(await logSize(), 5, 'the script ran after all')
  t.match(await a.budget.take(), { ok: false }, 'back on Redis: the share still refuses, and the replay goes again')
  t.equal(await logSize(), 5, 'the same five, not five more')
})

t.test('outage: calls made alone whose script failed go again with a later call', async (t) => {
  const admin = redisClient(redis.url)
  t.teardown(() => admin.disconnect())
  // [what, count, entries after the late script, entries after the next call]: with an admission,
  // the late script held 3 replayed and 1 admitted; the next call carries those 3 and the call the
  // replica then admitted alone (its fallback), and itself.
  for (const [label, count, late, again] of [['its share spent: the replay alone', 3, 3, 3], ['with an admission', 10, 4, 5]] as const) {
    const tag = uniqueName('again')
    const a = await replicaOf(t, 'a', { count, windowMs: 5000, replicas: 1, tag }, 100)
    const logSize = logSizeOf(t, tag)
    await a.deny()
    t.equal(await takeMany(a.budget, 3), 3, `${label}: alone`)
    await a.allow()
    await admin.call('CLIENT', 'PAUSE', '300', 'WRITE')
    await a.budget.take()
    await sleep(450)
    t.equal(await logSize(), late, `${label}: the script ran, after the replica gave up on it`)
    // Gone from Redis (as if it had never run): the replica still holds them and sends them again.
    await admin.del(`{${tag}}:log`)
    await a.budget.take()
    t.equal(await logSize(), again, `${label}: sent again`)
  }
})

t.test('outage: a long outage\'s calls go to Redis a batch per call', async (t) => {
  const tag = uniqueName('batch')
  const a = await replicaOf(t, 'a', { count: REPLAY_BATCH + 10, windowMs: 10_000, replicas: 1, tag })
  const logSize = logSizeOf(t, tag)
  await a.deny()
  t.equal(await takeMany(a.budget, REPLAY_BATCH + 1), REPLAY_BATCH + 1)
  await a.allow()
  t.match(await a.budget.take(), { ok: true })
  t.equal(await logSize(), REPLAY_BATCH + 1, 'one batch, and this call')
  t.match(await a.budget.take(), { ok: true })
  t.equal(await logSize(), REPLAY_BATCH + 3, 'the rest with the next')
})

t.test('outage: a reservation is taken back when Redis refuses or fails', async (t) => {
  const { a, b } = await twoReplicas(t, 'undo', 4, 2000)
  await a.deny()
  t.equal(await takeMany(a.budget, 1), 1, 'a alone: 1 of its share of 2')
  t.equal(await takeMany(b.budget, 4), 4, 'b fills Redis')
  await a.allow()
  t.match(await a.budget.take(), { ok: false, retryAfterMs: Number }, 'memory admits, Redis refuses')
  await a.deny()
  t.equal(await takeMany(a.budget, 2), 1, 'a alone again: the refused call did not keep its place in memory')

  const c = await replicaOf(t, 'c', { count: 2, windowMs: 2000, replicas: 1, tag: uniqueName('undo-fail') })
  await c.deny()
  t.equal(await takeMany(c.budget, 1), 1)
  await c.allow()
  await c.deny()
  t.same(await c.budget.take(), { ok: true, remaining: 0 }, 'Redis failed after memory reserved: the fallback counts the call once')
  t.equal(await takeMany(c.budget, 1), 0)
})

t.test('memory: a reservation taken back leaves the rest of the log as it was', async (t) => {
  let now = 0
  const budget = createMemoryBudget({ count: 3, windowMs: 1000, guardMs: 0, now: () => now, trackAlone: true })
  const first = budget.reserve()
  now = 5
  const second = budget.reserve()
  now = 10
  t.match(budget.take(), { ok: true, remaining: 0 })
  budget.unreserve(second.at)
  budget.unreserve(second.at)
  t.same(budget.take(), { ok: true, remaining: 0 }, 'one place freed, once')
  t.match(budget.take(), { ok: false })
  budget.unreserve(first.at)
  budget.unreserve(first.at)
  t.same(budget.take(), { ok: true, remaining: 0 }, 'the oldest freed (once), newer entries kept in order')
  t.same(budget.take(), { ok: false, retryAfterMs: 1001 }, 'the oldest left is now the take at 10')
  now = 20
  t.same(budget.takeAlone(10), { times: [10, 10, 10], at: 20 }, 'the three takes, not the reservations')
  t.same(budget.takeAlone(10).times, [], 'handed on once')
  budget.restoreAlone([])
  budget.restoreAlone([10, 10, 10])
  now = 1011
  budget.take()
  budget.restoreAlone([1])
  t.same(budget.takeAlone(10).times, [1011], 'restored takes leave the span like any other; older ones first')
  now = 1012
  budget.record()
  t.same(budget.takeAlone(10).times, [], 'what Redis admitted is not alone')

  const untracked = createMemoryBudget({ count: 3, windowMs: 1000 })
  untracked.take()
  untracked.restoreAlone([1])
  t.same(untracked.takeAlone(10).times, [], 'a budget that is no twin keeps nothing')
})

t.test('memory: the calls made alone are kept for a span only, however long the outage', async (t) => {
  let now = 0
  const budget = createMemoryBudget({ count: 2, windowMs: 100, guardMs: 0, now: () => now, trackAlone: true })
  for (now = 0; now < 1000; now += 60) t.ok(budget.take().ok)
  now = 960
  t.same(budget.takeAlone(1), { times: [900], at: 960 }, 'the oldest first, at most as many as asked')
  t.same(budget.takeAlone(1), { times: [960], at: 960 }, 'two of the seventeen in all')
})

// Last in this file: it restarts the suite's Redis, which forgets every key and ACL user.
t.test('outage: Redis restarts empty while one replica counts alone and the other is idle; the count holds', async (t) => {
  const tag = uniqueName('restart')
  const options = { count: 10, windowMs: 10_000, replicas: 2, tag }
  const stateA = await sharedStateOn(t, redis.url)
  const stateB = await sharedStateOn(t, redis.url)
  const a = createOrgBudget({ ...options, fallback: createStoreFallback({ sharedState: stateA, log: silentLog, pauseMs: 100 }) })
  const b = createOrgBudget({ ...options, fallback: createStoreFallback({ sharedState: stateB, log: silentLog, pauseMs: 100 }) })
  t.equal(await takeMany(a, 2) + await takeMany(b, 2), 4, 'through Redis')
  await redis.stop()
  await waitFor(() => stateB.mode() !== 'redis')
  t.equal(await takeMany(b, 5), 3, 'b alone: its share of 5, less the 2 it sent through Redis')
  await redis.start()
  await waitFor(() => stateA.mode() === 'redis' && stateB.mode() === 'redis', 8000)
  t.equal(await takeMany(a, 10), 3, 'a, idle during the outage, keeps its share for a span: Redis forgot everything')
  t.equal(await takeMany(b, 5), 0, 'b too')
})

// After the restart above: the suite's Redis is young again.
t.test('a replica that starts just after Redis restarted empty keeps to its share; one that starts on older data does not wait', async (t) => {
  const tag = uniqueName('late')
  const options = { count: 9, windowMs: 10_000, replicas: 3, tag }
  const budgetOn = async (): Promise<BudgetStore> => createOrgBudget({ ...options, fallback: createStoreFallback({ sharedState: await sharedStateOn(t, redis.url), log: silentLog, pauseMs: 100 }) })
  const a = await budgetOn()
  const b = await budgetOn()
  t.equal(await takeMany(a, 3) + await takeMany(b, 3), 6, 'a and b, three each')
  await redis.stop()
  await redis.start()
  // Redis forgot the six; a and b remember them, each its own three, and keep to their shares.
  const c = await budgetOn()
  await sleep(200)
  t.equal(await takeMany(c, 9), 3, 'c, started on an empty Redis, takes only its share: 9 in the window, not 15')
  t.equal(await takeMany(a, 3) + await takeMany(b, 3), 0)

  // A Redis whose data is older than a span: its log is whole, and a new replica may use all of it.
  const short = { count: 4, windowMs: 1000, replicas: 4, tag: uniqueName('young') }
  const admin = redisClient(redis.url)
  t.teardown(() => admin.disconnect())
  while (await dataAgeMs(admin) < 2000) await sleep(100)
  const d = createOrgBudget({ ...short, fallback: createStoreFallback({ sharedState: await sharedStateOn(t, redis.url), log: silentLog, pauseMs: 100 }) })
  await sleep(200)
  t.equal(await takeMany(d, 5), 4, 'the whole count, not its share of one')
})

t.test('redis: an upstream 429 halves this replica\'s twin too, so that a Redis outage right after it does not send at the full share', async (t) => {
  const options = { count: 10, windowMs: 60_000 }
  const real = await strictFallbackOn(t, redis.url)
  let down = false
  const fallback: StoreFallback = {
    redisConfigured: true,
    redisFor: () => down ? 0 : real.redisFor(),
    run: async (viaRedis, inMemory, whilePaused) => down ? inMemory() : await real.run(viaRedis, inMemory, whilePaused)
  }
  const budget = createRedisBudget({ ...options, fallback, tag: uniqueName('halved'), memory: createMemoryBudget(options) })
  await budget.decrease()
  t.equal(await takeMany(budget, 10), 5, 'Redis: halved to 5')
  down = true
  t.equal(await takeMany(budget, 10), 0, 'then Redis fails: the twin, halved as well and counting those 5, admits nothing more')
  // A 429 during the outage halves the twin once, not once for the call and once as its fallback.
  const alone = createRedisBudget({ ...options, count: 16, fallback, tag: uniqueName('halved-alone'), memory: createMemoryBudget({ ...options, count: 16 }) })
  await alone.decrease()
  t.equal(await takeMany(alone, 16), 8, 'Redis down throughout: halved once, to 8')
})

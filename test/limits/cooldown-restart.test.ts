import t, { type Test } from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis } from 'ioredis'
import { startRedis, redisClient } from '../helpers/redis.js'
import { buildTestApp } from '../helpers/app.js'
import { ApiError } from '../../src/errors.js'
import { createStoreFallback } from '../../src/limits/fallback.js'
import { createOrgBudget } from '../../src/limits/org-budget.js'
import { cooldownKey, createRedisCooldown } from '../../src/limits/cooldown.js'
import { createUpstreamGate, type UpstreamGate } from '../../src/limits/upstream-gate.js'
import type { SharedState } from '../../src/state/redis.js'
import { sharedStateOn, silentLog, uniqueName, waitFor } from './fixtures/support.js'

/**
 * The contract's shared cooldown across a Redis that loses it. Reproduced before the fix: replica
 * A got an upstream 429 with Retry-After 60; Redis was killed and restarted empty; replica B,
 * which had not seen the cooldown, then made a real upstream call while A went on refusing.
 */

const redis = await startRedis(t)

interface Replica { state: SharedState, gate: UpstreamGate }

/** One replica's shared state (its own client on `url`), fallback, org budget, cooldown and gate, wired as app.ts wires them. */
async function replica (t: Test, tag: string, url = redis.url): Promise<Replica> {
  const state = await sharedStateOn(t, url, 250)
  const fallback = createStoreFallback({ sharedState: state, log: silentLog })
  const gate = createUpstreamGate({
    budget: createOrgBudget({ count: 100, windowMs: 60_000, replicas: 2, fallback, tag }),
    cooldown: createRedisCooldown({ fallback, tag })
  })
  state.onBack?.(gate.restoreCooldown)
  return { state, gate }
}

/** The answer of `gate.acquire`: null when the call may go, else the refusal. */
async function acquired (gate: UpstreamGate): Promise<ApiError | null> {
  return await Promise.resolve().then(() => gate.acquire('list')).then(() => null, (error: unknown) => {
    if (error instanceof ApiError) return error
    throw error
  })
}

/** A refusal for the cooldown, whose Retry-After lies in [low, high] seconds (time passes while Redis restarts). */
function assertCooling (t: Test, refusal: ApiError | null, [low, high]: [number, number], what: string): void {
  t.ok(refusal !== null, `${what}: refused, no upstream call`)
  t.equal(refusal?.code, 'UPSTREAM_RATE_LIMITED')
  const seconds = Number(refusal?.headers?.['retry-after'])
  t.ok(seconds >= low && seconds <= high, `${what}: Retry-After ${seconds} s, in [${low}, ${high}]`)
}

/** Waits (at most `ms`) for `key` to exist; answers whether it does. */
async function appears (client: Redis, key: string, ms = 3000): Promise<boolean> {
  const end = Date.now() + ms
  while (Date.now() < end) {
    if (await client.exists(key) === 1) return true
    await sleep(20)
  }
  return false
}

function inspector (t: Test): Redis {
  const client = redisClient(redis.url, { maxRetriesPerRequest: 1 })
  t.teardown(() => client.disconnect())
  return client
}

t.test('Redis killed and restarted empty: the replica that still honours the cooldown writes it back, and the other stops again', async (t) => {
  const tag = uniqueName('restart')
  const a = await replica(t, tag)
  const b = await replica(t, tag)
  t.equal(await acquired(b.gate), null, 'B calls the upstream before the 429')
  t.equal(await a.gate.onRateLimited(60_000), 60_000, 'A hears a 429 with Retry-After 60')
  assertCooling(t, await acquired(b.gate), [60, 60], 'B, through Redis')
  // B's refusal taught it the cooldown too; a third replica that never asked stands for the B of
  // the incident, which knew nothing of it.
  const c = await replica(t, tag)

  await redis.stop()
  await redis.start()
  await waitFor(() => [a, b, c].every((r) => r.state.mode() === 'redis'), 10_000)
  const client = inspector(t)
  const key = cooldownKey(tag)
  t.ok(await appears(client, key), 'written back to the empty Redis')
  assertCooling(t, await acquired(c.gate), [50, 60], 'C, which never saw the 429')
  t.equal(await client.hget(key, 'streak'), '1', 'one episode')
  const ttl = await client.pttl(key)
  t.ok(ttl > 110_000 && ttl <= 120_000, `expires with the end plus the reset period (${ttl} ms)`)
  assertCooling(t, await acquired(a.gate), [50, 60], 'A, as before')
})

t.test('a 429 that came while Redis answered only errors: written back when the pause ends, on the same connection', async (t) => {
  const tag = uniqueName('pause')
  const admin = inspector(t)
  await admin.call('ACL', 'SETUSER', 'replica-a', 'on', '>pw', '~*', '&*', '+@all')
  const a = await replica(t, tag, redis.url.replace('redis://', 'redis://replica-a:pw@'))
  const b = await replica(t, tag)
  // A's scripts now fail (NOPERM) on a connection that stays ready, as OOM or READONLY would.
  await admin.call('ACL', 'SETUSER', 'replica-a', '-evalsha', '-eval')
  t.teardown(() => admin.call('ACL', 'DELUSER', 'replica-a').catch(() => {}))
  t.equal(await a.gate.onRateLimited(30_000), 30_000, 'held in A\'s memory only')
  t.equal(a.state.mode(), 'degraded', 'A leaves Redis alone for a pause')
  t.equal(await admin.exists(cooldownKey(tag)), 0, 'not in Redis')
  t.equal(await acquired(b.gate), null, 'so B still calls the upstream')
  await admin.call('ACL', 'SETUSER', 'replica-a', '+evalsha', '+eval')
  t.ok(await appears(admin, cooldownKey(tag)), 'written back once A\'s pause ended')
  t.equal(a.state.redis?.status, 'ready', 'without a reconnection')
  assertCooling(t, await acquired(b.gate), [20, 30], 'B')
})

t.test('a 429 whose trip finds less than the replica honours (Redis lost it): written back, and no second halving of the budget', async (t) => {
  const tag = uniqueName('lost')
  const a = await replica(t, tag)
  const b = await replica(t, tag)
  const client = inspector(t)
  t.equal(await a.gate.onRateLimited(60_000), 60_000)
  const aimd = `{${tag}}:aimd`
  t.equal(await client.exists(aimd), 1, 'the budget was halved for the episode')
  // Lost without a reconnection (FLUSHALL), and before anything wrote it back: a call that was in
  // flight comes back 429 with a short Retry-After.
  await redis.flush()
  const answered = await a.gate.onRateLimited(1000)
  t.ok(answered > 59_000 && answered <= 60_000, `the cooldown A honours (${answered} ms), not 1 s`)
  const left = Number(await client.hget(cooldownKey(tag), 'until')) - Number((await client.time())[0]) * 1000
  t.ok(left > 58_000, `Redis holds it again (${left} ms)`)
  t.equal(await client.exists(aimd), 0, 'the same episode: the budget is not halved again')
  assertCooling(t, await acquired(b.gate), [50, 60], 'B')
})

t.test('the app: buildApp writes the cooldown back after a restart of Redis (two replicas)', async (t) => {
  await redis.flush()
  const [a, b] = [(await buildTestApp(t, { redis })).app, (await buildTestApp(t, { redis })).app]
  t.equal(await a.upstreamGate.onRateLimited(60_000), 60_000, 'replica A hears a 429 with Retry-After 60')
  await redis.stop()
  await redis.start()
  await waitFor(() => a.sharedState.mode() === 'redis' && b.sharedState.mode() === 'redis', 10_000)
  t.ok(await appears(inspector(t), cooldownKey()), 'written back')
  assertCooling(t, await acquired(b.upstreamGate), [50, 60], 'replica B, which never saw the 429')
})

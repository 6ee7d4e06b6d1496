import t, { type Test } from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { startRedis, redisClient } from '../helpers/redis.js'
import { clampRetryAfter, createMemoryCooldown, createRedisCooldown, type BackoffOptions, type CooldownStore } from '../../src/limits/cooldown.js'
import { steppedWallClock, strictFallbackOn, uniqueName } from './fixtures/support.js'

const redis = await startRedis(t)

// Short bounds so that a few backoff episodes fit in a test.
const fast: BackoffOptions = { minMs: 10, baseMs: 40, maxMs: 200, resetAfterMs: 400 }

type Make = (t: Test, options?: BackoffOptions) => Promise<CooldownStore>

const kinds: Array<[string, Make]> = [
  ['memory', async (_t, options = fast) => createMemoryCooldown(options)],
  ['redis', async (t, options = fast) => createRedisCooldown({ ...options, fallback: await strictFallbackOn(t, redis.url), tag: uniqueName('cooldown') })]
]

for (const [kind, make] of kinds) {
  t.test(`${kind}: none until a 429`, async (t) => {
    const cooldown = await make(t)
    t.equal(await cooldown.remaining(), 0)
  })

  t.test(`${kind}: a Retry-After is honoured, extended but never shortened`, async (t) => {
    const cooldown = await make(t)
    const first = await cooldown.trip(300, 0.5)
    t.equal(first.fresh, true)
    t.ok(first.remainingMs > 280 && first.remainingMs <= 300)
    // The bounds below leave room for the time between the calls (a loaded machine's stalls):
    // shortened, the cooldown would have at most 100 ms left; not extended, at most 300.
    const shorter = await cooldown.trip(100, 0.5)
    t.equal(shorter.fresh, false, 'still the same episode')
    t.ok(shorter.remainingMs > 100 && shorter.remainingMs <= 300, `not shortened (${shorter.remainingMs})`)
    const longer = await cooldown.trip(600, 0.5)
    t.ok(longer.remainingMs > 580 && longer.remainingMs <= 600, 'extended')
    const left = await cooldown.remaining()
    t.ok(left > 300 && left <= 600, `still extended (${left})`)
  })

  t.test(`${kind}: it ends`, async (t) => {
    const cooldown = await make(t)
    await cooldown.trip(300, 0.5)
    t.ok(await cooldown.remaining() > 0)
    await sleep(350)
    t.equal(await cooldown.remaining(), 0)
  })

  t.test(`${kind}: without Retry-After, consecutive episodes double the backoff; a quiet period resets it`, async (t) => {
    const cooldown = await make(t)
    // Jitter 0.5 is the factor 1.0: exactly base * 2^(n-1).
    const expected = [40, 80, 160, 200]
    for (const ms of expected) {
      const trip = await cooldown.trip(null, 0.5)
      t.equal(trip.fresh, true)
      t.ok(trip.remainingMs > ms - 15 && trip.remainingMs <= ms, `${trip.remainingMs} ~ ${ms} (capped at maxMs)`)
      await sleep(trip.remainingMs + 5)
    }
    await sleep(420)
    const trip = await cooldown.trip(null, 0.5)
    t.ok(trip.remainingMs > 25 && trip.remainingMs <= 40, `back to the base (${trip.remainingMs})`)
  })

  t.test(`${kind}: extend writes back a cooldown: a later end is kept, never shortened, and it is not a new episode`, async (t) => {
    const cooldown = await make(t)
    t.equal(await cooldown.extend(300), 300, 'none ran: it ends in 300 ms')
    // As above: shortened to 100 ms, or written back as 0, it would have at most 100 ms left.
    const left = await cooldown.remaining()
    t.ok(left > 100 && left <= 300, `running (${left})`)
    const shorter = await cooldown.extend(100)
    t.ok(shorter > 100 && shorter <= 300, `not shortened (${shorter})`)
    t.ok(await cooldown.extend(0) > 100, 'nothing to write back: unchanged')
    const longer = await cooldown.extend(500)
    t.ok(longer === 500, `extended (${longer})`)
    const during = await cooldown.trip(null, 0.5)
    t.equal(during.fresh, false, 'a 429 during it is the same episode')
    await sleep(during.remainingMs + 5)
    // The written-back cooldown was one episode: the next, within the reset period, is the second.
    const next = await cooldown.trip(null, 0.5)
    t.equal(next.fresh, true)
    t.ok(next.remainingMs > 65 && next.remainingMs <= 80, `base * 2 (${next.remainingMs})`)
  })

  t.test(`${kind}: extend keeps the streak of the episodes before it, and starts over after a quiet period`, async (t) => {
    const cooldown = await make(t)
    await sleep((await cooldown.trip(null, 0.5)).remainingMs + 5)
    const second = await cooldown.trip(null, 0.5)
    t.ok(second.remainingMs > 65 && second.remainingMs <= 80, `the second episode (${second.remainingMs})`)
    await cooldown.extend(200)
    await sleep(205)
    const third = await cooldown.trip(null, 0.5)
    t.ok(third.remainingMs > 145 && third.remainingMs <= 160, `still counted from two: the third (${third.remainingMs})`)
    // Quiet past the reset period: the streak is gone (in Redis with the record).
    await sleep(third.remainingMs + 420)
    await cooldown.extend(50)
    await sleep(55)
    const after = await cooldown.trip(null, 0.5)
    t.ok(after.remainingMs > 65 && after.remainingMs <= 80, `one episode (the written-back one) before it (${after.remainingMs})`)
  })

  t.test(`${kind}: jitter spreads the backoff over [0.75, 1.25) of it`, async (t) => {
    const low = await (await make(t)).trip(null, 0)
    const high = await (await make(t)).trip(null, 0.999)
    t.ok(low.remainingMs > 15 && low.remainingMs <= 30, `low ${low.remainingMs}`)
    t.ok(high.remainingMs > 35 && high.remainingMs <= 50, `high ${high.remainingMs}`)
  })

  t.test(`${kind}: a backoff is rounded to the nearest millisecond and never below the shortest`, async (t) => {
    // 40 * (0.75 + 0.5 * 0.335) = 36.7: a fresh trip answers its own delay, to the millisecond.
    t.equal((await (await make(t)).trip(null, 0.335)).remainingMs, 37, 'rounded, not cut')
    // 40 * 0.75 = 30, below a shortest backoff of 50.
    t.equal((await (await make(t, { ...fast, minMs: 50 })).trip(null, 0)).remainingMs, 50, 'the shortest')
  })

  t.test(`${kind}: extend(0) after a quiet period writes nothing back: the next backoff starts over`, async (t) => {
    const cooldown = await make(t)
    await sleep((await cooldown.trip(null, 0.5)).remainingMs + 420)
    t.equal(await cooldown.extend(0), 0, 'nothing to write back')
    const next = await cooldown.trip(null, 0.5)
    t.ok(next.remainingMs > 25 && next.remainingMs <= 40, `the first of a new streak, not the second (${next.remainingMs})`)
  })
}

t.test('the default bounds: at least a second, at most ten minutes', async (t) => {
  t.equal(clampRetryAfter(null), null)
  t.equal(clampRetryAfter(Number.NaN), null)
  t.equal(clampRetryAfter(0), 1000)
  t.equal(clampRetryAfter(2500.2), 2501)
  t.equal(clampRetryAfter(86_400_000), 600_000)
  let now = 0
  const cooldown = createMemoryCooldown({ now: () => now })
  t.equal(cooldown.trip(null, 0).remainingMs, 1000, 'the first backoff is a second')
  now = 5000
  t.equal(cooldown.trip(null, 0.5).remainingMs, 2000)
})

t.test('memory: a wall clock stepped back or forth (NTP) neither stretches nor ends a cooldown', async (t) => {
  const wall = steppedWallClock(t)
  const cooldown = createMemoryCooldown()
  t.equal(cooldown.trip(5000, 0.5).remainingMs, 5000)
  wall.step(3_600_000)
  const forth = cooldown.remaining()
  t.ok(forth > 4000 && forth <= 5000, `not ended an hour early (${forth})`)
  wall.step(-3_600_000)
  const back = cooldown.remaining()
  t.ok(back > 4000 && back <= 5000, `not an hour longer (${back})`)
  t.equal(cooldown.trip(null, 0.5).fresh, false, 'still the same episode')
})

t.test('redis: one replica trips, the other sees it at once; the key only grows', async (t) => {
  const tag = uniqueName('shared')
  const a = createRedisCooldown({ ...fast, fallback: await strictFallbackOn(t, redis.url), tag })
  const b = createRedisCooldown({ ...fast, fallback: await strictFallbackOn(t, redis.url), tag })
  t.equal(await b.remaining(), 0)
  await a.trip(2000, 0.5)
  const seen = await b.remaining()
  t.ok(seen > 1500 && seen <= 2000, `b sees ${seen}`)
  const client = redisClient(redis.url)
  t.teardown(() => client.disconnect())
  const key = `{${tag}}:cooldown`
  const ttl = await client.pttl(key)
  t.ok(ttl > 1500 && ttl <= 2000 + 400, `expires after the end plus the reset period (${ttl})`)
  const second = await b.trip(50, 0.5)
  t.equal(second.fresh, false)
  t.ok(await client.pttl(key) > ttl - 500, 'a shorter 429 did not shorten the key (50 + 400 would)')
})

t.test('redis: a cooldown written back to an empty Redis is one episode, with the expiry of a trip', async (t) => {
  const tag = uniqueName('extend')
  const cooldown = createRedisCooldown({ ...fast, fallback: await strictFallbackOn(t, redis.url), tag })
  const client = redisClient(redis.url)
  t.teardown(() => client.disconnect())
  const key = `{${tag}}:cooldown`
  t.equal(await cooldown.extend(2000), 2000)
  t.equal(await client.hget(key, 'streak'), '1')
  const ttl = await client.pttl(key)
  t.ok(ttl > 2000 && ttl <= 2000 + 400, `expires after the end plus the reset period (${ttl})`)
  await cooldown.extend(500)
  t.ok(await client.pttl(key) > ttl - 500, 'a shorter one changed nothing')
})

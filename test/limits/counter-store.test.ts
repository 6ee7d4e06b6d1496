import t, { type Test } from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { startRedis, redisClient } from '../helpers/redis.js'
import { createMemoryCounterStore, createRedisCounterStore, type CounterStore } from '../../src/limits/counter-store.js'
import { steppedWallClock, strictFallbackOn, uniqueName } from './fixtures/support.js'

const redis = await startRedis(t)

type Make = (t: Test) => Promise<CounterStore>

const kinds: Array<[string, Make]> = [
  ['memory', async () => createMemoryCounterStore()],
  ['redis', async (t) => createRedisCounterStore({ fallback: await strictFallbackOn(t, redis.url), prefix: uniqueName('counter') + ':' })]
]

// One suite, both implementations: the Redis store must behave exactly as its memory twin.
for (const [kind, make] of kinds) {
  t.test(`${kind}: counts every hit of a window, with the time left`, async (t) => {
    const store = await make(t)
    const rate = { count: 3, windowMs: 1000 }
    let lastReset = Number.POSITIVE_INFINITY
    for (let i = 1; i <= 5; i++) {
      const hit = await store.hit('ip:1.2.3.4', rate)
      t.equal(hit.count, i, 'hits over the limit keep counting')
      t.ok(hit.resetMs > 0 && hit.resetMs <= 1000)
      t.ok(hit.resetMs <= lastReset, 'the window does not move')
      lastReset = hit.resetMs
    }
  })

  t.test(`${kind}: keys are counted apart`, async (t) => {
    const store = await make(t)
    const rate = { count: 3, windowMs: 1000 }
    await store.hit('ip:a', rate)
    await store.hit('ip:a', rate)
    t.equal((await store.hit('ip:b', rate)).count, 1)
    t.equal((await store.hit('session:a', rate)).count, 1)
    t.equal((await store.hit('ip:a', rate)).count, 3)
  })

  t.test(`${kind}: several keys in order, each at its own rate`, async (t) => {
    const store = await make(t)
    const session = { count: 3, windowMs: 1000 }
    const cancel = { count: 1, windowMs: 500 }
    const both = [{ key: 'session:{a}', rate: session }, { key: 'cancel:{a}', rate: cancel }]
    const first = await store.hitInOrder(both)
    t.same(first.map((hit) => hit.count), [1, 1])
    t.ok((first[0]?.resetMs ?? 0) > 500 && (first[1]?.resetMs ?? 0) <= 500, 'each key has its own window')
    t.same((await store.hitInOrder(both)).map((hit) => hit.count), [2, 2], 'the last key is over its rate: nothing after it to skip')
    t.same((await store.hitInOrder([both[0]!])).map((hit) => hit.count), [3])
  })

  t.test(`${kind}: the keys after the first one over its rate are not counted`, async (t) => {
    const store = await make(t)
    const session = { count: 1, windowMs: 1000 }
    const cancel = { count: 5, windowMs: 1000 }
    const both = [{ key: 'session:{b}', rate: session }, { key: 'cancel:{b}', rate: cancel }]
    t.same((await store.hitInOrder(both)).map((hit) => hit.count), [1, 1])
    const refused = await store.hitInOrder(both)
    t.same(refused.map((hit) => hit.count), [2], 'stopped at the session key')
    t.same((await store.hitInOrder(both)).map((hit) => hit.count), [3])
    t.equal((await store.hit('cancel:{b}', cancel)).count, 2, 'the cancel key was counted once only')
  })

  // The windows below are 400 ms: what must happen within one (five calls here, two in the next
  // test, Redis round trips for the Redis store) must not miss it by a loaded machine's stall.
  t.test(`${kind}: peek reads a window without counting`, async (t) => {
    const store = await make(t)
    const rate = { count: 2, windowMs: 400 }
    t.equal(await store.peek('p'), null, 'no window yet')
    await store.hit('p', rate)
    await store.hit('p', rate)
    await store.hit('p', rate)
    const seen = await store.peek('p')
    t.equal(seen?.count, 3, 'every hit, over the limit too')
    t.ok((seen?.resetMs ?? 0) > 0 && (seen?.resetMs ?? 0) <= 400, 'with the time left')
    t.equal((await store.peek('p'))?.count, 3, 'peeking counted nothing')
    t.equal(await store.peek('other'), null, 'keys apart')
    await sleep(450)
    t.equal(await store.peek('p'), null, 'the window ended')
    t.equal((await store.hit('p', rate)).count, 1, 'and the next hit starts a new one')
  })

  t.test(`${kind}: a new window starts once the last one ended`, async (t) => {
    const store = await make(t)
    const rate = { count: 2, windowMs: 400 }
    await store.hit('k', rate)
    t.equal((await store.hit('k', rate)).count, 2)
    await sleep(450)
    const hit = await store.hit('k', rate)
    t.equal(hit.count, 1)
    t.ok(hit.resetMs > 200 && hit.resetMs <= 400)
  })
}

t.test('memory: a flood of keys is bounded (expired windows go first, then the oldest)', async (t) => {
  let now = 0
  const store = createMemoryCounterStore({ now: () => now, maxKeys: 3 })
  const rate = { count: 5, windowMs: 100 }
  store.hit('a', rate)
  store.hit('a', rate)
  now = 50
  store.hit('b', rate)
  store.hit('c', rate)
  store.hit('d', rate)
  t.equal(store.hit('b', rate).count, 2, 'b kept: the oldest window (a) was dropped')
  t.equal(store.hit('a', rate).count, 1, 'a starts over')
  now = 200
  store.hit('e', rate)
  t.equal(store.hit('e', rate).count, 2)
})

t.test('memory: full, expired windows go before a live one, however old the live one is', async (t) => {
  // Kills dropping the sweep of expired windows from makeRoom (counter-store.ts): the oldest key,
  // a live window, would be dropped (its count started over) while expired ones stay.
  let now = 0
  const store = createMemoryCounterStore({ now: () => now, maxKeys: 3 })
  store.hit('live', { count: 5, windowMs: 1000 })
  store.hit('x', { count: 5, windowMs: 10 })
  store.hit('y', { count: 5, windowMs: 10 })
  now = 50
  store.hit('new', { count: 5, windowMs: 1000 })
  t.equal(store.hit('live', { count: 5, windowMs: 1000 }).count, 2, 'the live window kept its count')
})

t.test('memory: a window ends exactly at its length, as a Redis key with that PX does', async (t) => {
  // Kills `window.endsAt <= at` -> `<` in hit (counter-store.ts).
  let now = 0
  const store = createMemoryCounterStore({ now: () => now })
  const rate = { count: 5, windowMs: 100 }
  store.hit('a', rate)
  now = 99
  t.same(store.hit('a', rate), { count: 2, resetMs: 1 }, 'the last millisecond of the window')
  now = 100
  t.equal(store.peek('a'), null, 'ended')
  t.same(store.hit('a', rate), { count: 1, resetMs: 100 }, 'a new window')
})

t.test('memory: when full of live windows, the oldest tenth goes at once, not one key per request', async (t) => {
  const store = createMemoryCounterStore({ now: () => 0, maxKeys: 1000 })
  const rate = { count: 5, windowMs: 60_000 }
  for (let i = 0; i < 1000; i++) store.hit(`k${i}`, rate)
  // One new key: a hundred old windows are dropped together (before: only k0, and the next new
  // key would scan the whole map again).
  store.hit('new-1', rate)
  t.equal(store.hit('k50', rate).count, 1, 'k50 (among the oldest hundred) starts over')
  t.equal(store.hit('k100', rate).count, 2, 'k100 (the 101st oldest) was kept')
  t.equal(store.hit('k999', rate).count, 2, 'so were the newest')
  t.equal(store.hit('new-1', rate).count, 2, 'and the new key')
})

t.test('memory: a wall clock stepped back or forth (NTP) neither stretches nor ends a window', async (t) => {
  const wall = steppedWallClock(t)
  const store = createMemoryCounterStore()
  const rate = { count: 5, windowMs: 60_000 }
  store.hit('ip:1.2.3.4', rate)
  wall.step(-3_600_000)
  const back = store.hit('ip:1.2.3.4', rate)
  t.equal(back.count, 2)
  t.ok(back.resetMs <= 60_000, `the window and its Retry-After not an hour longer (${back.resetMs})`)
  wall.step(3_600_000)
  const forth = store.hit('ip:1.2.3.4', rate)
  t.equal(forth.count, 3, 'the window did not end an hour early')
  t.ok(forth.resetMs > 50_000 && forth.resetMs <= 60_000)
})

t.test('redis: exact admission from three clients hitting at once', async (t) => {
  const prefix = uniqueName('exact') + ':'
  const stores = await Promise.all([1, 2, 3].map(async () => createRedisCounterStore({ fallback: await strictFallbackOn(t, redis.url), prefix })))
  const rate = { count: 100, windowMs: 60_000 }
  const hits = await Promise.all(Array.from({ length: 300 }, async (_, i) => await (stores[i % 3] as CounterStore).hit('ip:9.9.9.9', rate)))
  t.equal(hits.filter((hit) => hit.count <= rate.count).length, 100, 'admitted == limit')
  t.same(hits.map((hit) => hit.count).sort((a, b) => a - b), Array.from({ length: 300 }, (_, i) => i + 1), 'every hit counted once')
})

t.test('the Redis variants\' fallback is strict: a script Redis refuses fails the call, no memory twin answers', async (t) => {
  const admin = redisClient(redis.url)
  t.teardown(() => admin.disconnect())
  const user = uniqueName('no-scripts')
  await admin.call('ACL', 'SETUSER', user, 'on', '>pw', '~*', '&*', '+@all', '-eval', '-evalsha')
  const fallback = await strictFallbackOn(t, redis.url.replace('redis://', `redis://${user}:pw@`))
  const store = createRedisCounterStore({ fallback, prefix: uniqueName('strict') + ':' })
  await t.rejects(async () => await store.hit('ip:1.2.3.4', { count: 3, windowMs: 1000 }), /NOPERM/)
})

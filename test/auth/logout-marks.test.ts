import t, { type Test } from 'tap'
import { DATA_SINCE_KEY } from '../../src/state/redis.js'
import { setTimeout as sleep } from 'node:timers/promises'
import { pino } from 'pino'
import type { Redis } from 'ioredis'
import { ApiError } from '../../src/errors.js'
import { createSharedState } from '../../src/state/redis.js'
import { createLogoutMarks, LOGOUT_MARK_PREFIX, type LogoutMarks } from '../../src/auth/logout-marks.js'
import { startRedis } from '../helpers/redis.js'

/** The back-channel logouts' marks: one suite for both stores, then what only one of them has. */

const silent = pino({ level: 'silent' })

interface Harness {
  marks: LogoutMarks
  clock: { at: number }
  /** Lets a time to live pass: the injected clock for memory, Redis's own for Redis. */
  pass: (ms: number) => Promise<void>
  redis?: Redis
}

const redisServer = await startRedis(t)

async function connectedRedis (t: Test): Promise<Redis> {
  // A generous command bound: these tests are about marks, not timeouts, and a loaded machine
  // can hold a command past the default 250 ms.
  const sharedState = createSharedState({ url: redisServer.url, log: silent, commandTimeoutMs: 2000 })
  t.teardown(() => sharedState.close())
  while (sharedState.mode() !== 'redis') await sleep(5)
  return sharedState.redis as Redis
}

const kinds: Array<{ name: string, make: (t: Test) => Promise<Harness> }> = [
  {
    name: 'memory',
    make: async () => {
      const clock = { at: 1_700_000_000_000 }
      return { marks: createLogoutMarks({ redis: null }, () => clock.at), clock, pass: async (ms) => { clock.at += ms } }
    }
  },
  {
    name: 'redis',
    make: async (t) => {
      await redisServer.flush()
      const redis = await connectedRedis(t)
      const clock = { at: 1_700_000_000_000 }
      return { marks: createLogoutMarks({ redis }, () => clock.at), clock, pass: async (ms) => { await sleep(ms) }, redis }
    }
  }
]

for (const kind of kinds) {
  t.test(`${kind.name} store`, async (t) => {
    t.test('a mark holds its logout time until it expires', async (t) => {
      const { marks, pass } = await kind.make(t)
      t.equal(await marks.markedAt('a'), null, 'nothing marked')
      await marks.mark('a', 1000, 300)
      t.equal(await marks.markedAt('a'), 1000)
      t.equal(await marks.markedAt('b'), null, 'another id is its own')
      await pass(400)
      t.equal(await marks.markedAt('a'), null, 'forgotten once expired')
      await marks.mark('a', 900, 300)
      t.equal(await marks.markedAt('a'), 900, 'an expired mark does not hold back an earlier logout')
    })

    t.test('a later logout moves the mark on, with its own time to live; an earlier one changes nothing', async (t) => {
      const { marks, pass } = await kind.make(t)
      await marks.mark('a', 1000, 300)
      await marks.mark('a', 999, 60_000)
      t.equal(await marks.markedAt('a'), 1000, 'the earlier logout is covered by the later one')
      await marks.mark('a', 1000, 60_000)
      await pass(400)
      t.equal(await marks.markedAt('a'), null, 'nor does the same logout again extend it')
      await marks.mark('a', 1000, 300)
      await marks.mark('a', 1001, 60_000)
      await pass(400)
      t.equal(await marks.markedAt('a'), 1001, 'the later one lasts for its own time')
    })
  })
}

t.test('redis: one key per id, under the prefix, expiring by itself', async (t) => {
  await redisServer.flush()
  const redis = await connectedRedis(t)
  const marks = createLogoutMarks({ redis })
  await marks.mark('hashed-id', 1000, 60_000)
  // Beside the shared state's own marker of the data's age.
  t.same((await redis.keys('*')).filter((key) => key !== DATA_SINCE_KEY), [`${LOGOUT_MARK_PREFIX}hashed-id`])
  const ttl = await redis.pttl(`${LOGOUT_MARK_PREFIX}hashed-id`)
  t.ok(ttl > 0 && ttl <= 60_000, 'a TTL')
})

t.test('memory stays bounded', async (t) => {
  let now = 0
  const marks = createLogoutMarks({ redis: null }, () => now)
  for (let i = 0; i < 10_000; i++) await marks.mark(`fill-${i}`, 1, 10)
  now = 100
  await marks.mark('after-sweep', 1, 1000)
  t.equal(await marks.markedAt('after-sweep'), 1, 'expired marks swept when full')
  t.equal(await marks.markedAt('fill-0'), null)
  for (let i = 0; i < 9_999; i++) await marks.mark(`live-${i}`, 1, 100_000)
  await marks.mark('after-sweep', 2, 100_000)
  await marks.mark('overflow', 1, 100_000)
  t.equal(await marks.markedAt('live-0'), null, 'the oldest dropped when full of live marks')
  t.equal(await marks.markedAt('live-1'), 1)
  t.equal(await marks.markedAt('after-sweep'), 2, 'a mark moved on counts as new')
  t.equal(await marks.markedAt('overflow'), 1)
})

t.test('memory, full: a live mark is never dropped while expired ones are kept, nor by moving a mark on', async (t) => {
  let now = 0
  const marks = createLogoutMarks({ redis: null }, () => now)
  // Kills dropping the sweep of expired marks (logout-marks.ts): without it the oldest mark goes,
  // here the one live logout among 9 999 expired ones.
  await marks.mark('live', 7, 1_000_000)
  for (let i = 0; i < 9_999; i++) await marks.mark(`short-${i}`, 1, 10)
  now = 100
  await marks.mark('new', 1, 1000)
  t.equal(await marks.markedAt('live'), 7, 'the live mark kept: the expired ones went')
  t.equal(await marks.markedAt('new'), 1)

  // Kills dropping `marks.delete(id)` before the set: moving on a mark already held, when the
  // memory is full, must not push out another logout's mark.
  const full = createLogoutMarks({ redis: null }, () => now)
  for (let i = 0; i < 10_000; i++) await full.mark(`m-${i}`, 1, 1_000_000)
  await full.mark('m-5', 2, 1_000_000)
  t.equal(await full.markedAt('m-5'), 2, 'moved on')
  t.equal(await full.markedAt('m-0'), 1, 'and the oldest mark is still there')
})

t.test('the default clock', async (t) => {
  const marks = createLogoutMarks({ redis: null })
  await marks.mark('a', 1000, 60_000)
  t.equal(await marks.markedAt('a'), 1000)
  await marks.mark('b', 1000, -1)
  t.equal(await marks.markedAt('b'), null, 'already past')
})

t.test('redis down: 503 with Retry-After, never a memory fallback', async (t) => {
  const server = await startRedis(t)
  const sharedState = createSharedState({ url: server.url, log: silent })
  t.teardown(() => sharedState.close())
  while (sharedState.mode() !== 'redis') await sleep(5)
  const marks = createLogoutMarks(sharedState)
  await marks.mark('a', 1000, 60_000)
  await server.stop()
  const operations: Array<[string, () => Promise<unknown>]> = [['mark', () => marks.mark('a', 1001, 60_000)], ['markedAt', () => marks.markedAt('a')]]
  for (const [name, operation] of operations) {
    const error = await operation().then(() => null, (caught: unknown) => caught)
    t.ok(error instanceof ApiError, name)
    t.match(error, { statusCode: 503, code: 'SERVICE_UNAVAILABLE', headers: { 'retry-after': '1' } }, name)
  }
})

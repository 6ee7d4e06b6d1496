import t, { type Test } from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis } from 'ioredis'
import { startRedis } from '../helpers/redis.js'
import {
  createMemoryIdempotencyStore,
  createRedisIdempotencyStore,
  idempotencyStoreFor,
  IdempotencyStoreError,
  type IdempotencyStore
} from '../../src/idempotency/store.js'
import { requestFingerprint } from '../../src/idempotency/index.js'
import type { SharedState } from '../../src/state/redis.js'

const LONG = { ttlMs: 60_000, inFlightTtlMs: 30_000 }
const FP = requestFingerprint('scope', '6f1c1d5e-4a47-4f0e-9a55-1d0b1c7e9a11', 'sick')
const OTHER_FP = requestFingerprint('scope', '6f1c1d5e-4a47-4f0e-9a55-1d0b1c7e9a11', 'travel')
const DONE = { statusCode: 200, body: { status: 200, success: true, message: 'Meeting cancelled successfully' } }

type MakeStore = (t: Test) => Promise<IdempotencyStore>

let counter = 0
function fresh (): string {
  counter += 1
  return `key-${counter}-${Date.now()}`
}

async function started (store: IdempotencyStore, scope: string, key: string, options = LONG): Promise<string> {
  const begun = await store.begin(scope, key, FP, options)
  if (begun.kind !== 'started') throw new Error(`expected started, got ${begun.kind}`)
  return begun.token
}

/** The one contract both stores keep. */
function storeSuite (name: string, make: MakeStore): void {
  t.test(`${name} store`, async (t) => {
    t.test('first begin starts; the same request again is in flight', async (t) => {
      const store = await make(t)
      const key = fresh()
      const token = await started(store, 'scope-a', key)
      t.type(token, 'string')
      const again = await store.begin('scope-a', key, FP, LONG)
      t.equal(again.kind, 'in-flight')
      if (again.kind === 'in-flight') t.ok(again.retryAfterMs > 0 && again.retryAfterMs <= 30_000, 'retry after within the marker life')
    })

    t.test('another fingerprint is a mismatch, in flight and when done', async (t) => {
      const store = await make(t)
      const key = fresh()
      const token = await started(store, 'scope-a', key)
      t.same(await store.begin('scope-a', key, OTHER_FP, LONG), { kind: 'mismatch' })
      t.equal(await store.complete('scope-a', key, token, DONE, 60_000), true)
      t.same(await store.begin('scope-a', key, OTHER_FP, LONG), { kind: 'mismatch' })
    })

    t.test('complete stores the answer for replay; only the owner may complete', async (t) => {
      const store = await make(t)
      const key = fresh()
      const token = await started(store, 'scope-a', key)
      t.equal(await store.complete('scope-a', key, 'not-the-token', DONE, 60_000), false)
      const before = Date.now()
      t.equal(await store.complete('scope-a', key, token, DONE, 60_000), true)
      const replay = await store.begin('scope-a', key, FP, LONG)
      t.equal(replay.kind, 'replay')
      if (replay.kind === 'replay') {
        t.same(replay.answer, DONE)
        t.ok(replay.completedAt >= before - 1000 && replay.completedAt <= Date.now() + 1000, 'completedAt is a time')
      }
      t.equal(await store.complete('scope-a', key, token, DONE, 60_000), false, 'a done record has no owner')
      t.equal(await store.release('scope-a', key, token), false, 'nor can it be released')
    })

    t.test('retakeFailed: a finished error is claimed by one begin; a 200 is replayed; without the option both are', async (t) => {
      const store = await make(t)
      const FAILED = { statusCode: 502, body: { status: 502, success: false, code: 'UPSTREAM_ERROR', message: 'x' } }
      const retake = { ...LONG, retakeFailed: true }
      const key = fresh()
      t.equal(await store.complete('scope-a', key, await started(store, 'scope-a', key), FAILED, 60_000), true)
      const plain = await store.begin('scope-a', key, FP, LONG)
      t.same(plain.kind === 'replay' ? plain.answer : plain, FAILED, 'replayed without the option')
      const claimed = await store.begin('scope-a', key, FP, retake)
      t.equal(claimed.kind, 'started', 'claimed by the first retry')
      t.equal((await store.begin('scope-a', key, FP, retake)).kind, 'in-flight', 'the second retry finds it in flight')
      t.same(await store.begin('scope-a', key, OTHER_FP, retake), { kind: 'mismatch' }, 'the fingerprint stays')
      if (claimed.kind !== 'started') return
      t.equal(await store.complete('scope-a', key, claimed.token, DONE, 60_000), true, 'the retry owns it')
      const replay = await store.begin('scope-a', key, FP, retake)
      t.same(replay.kind === 'replay' ? replay.answer : replay, DONE, 'a 200 is replayed even with the option')

      // A retaken record is in flight, never sent: when its new owner dies without sending, the
      // next begin starts afresh, with neither the old error nor an unknown outcome.
      const short = { ttlMs: 60_000, inFlightTtlMs: 60, retakeFailed: true }
      const other = fresh()
      t.equal(await store.complete('scope-a', other, await started(store, 'scope-a', other), FAILED, 60_000), true)
      t.equal((await store.begin('scope-a', other, FP, short)).kind, 'started')
      await sleep(100)
      t.equal((await store.begin('scope-a', other, FP, { ttlMs: 60_000, inFlightTtlMs: 60 })).kind, 'started', 'no stale replay')
    })

    t.test('release frees the key; only the owner may release', async (t) => {
      const store = await make(t)
      const key = fresh()
      const token = await started(store, 'scope-a', key)
      t.equal(await store.release('scope-a', key, 'other'), false)
      t.equal((await store.begin('scope-a', key, FP, LONG)).kind, 'in-flight', 'still held')
      t.equal(await store.release('scope-a', key, token), true)
      t.equal((await store.begin('scope-a', key, OTHER_FP, LONG)).kind, 'started', 'free, even for another body')
      t.equal(await store.release('scope-b', fresh(), token), false, 'absent record')
    })

    t.test('markUnknown keeps the fingerprint; the next begin owns the resolution', async (t) => {
      const store = await make(t)
      const key = fresh()
      const token = await started(store, 'scope-a', key)
      t.equal(await store.markUnknown('scope-a', key, 'other', 60_000), false)
      t.equal(await store.markUnknown('scope-a', key, token, 60_000), true)
      t.same(await store.begin('scope-a', key, OTHER_FP, LONG), { kind: 'mismatch' })
      const takeover = await store.begin('scope-a', key, FP, LONG)
      t.equal(takeover.kind, 'unknown-outcome')
      t.equal((await store.begin('scope-a', key, FP, LONG)).kind, 'in-flight', 'a concurrent retry waits')
      if (takeover.kind !== 'unknown-outcome') return
      t.not(takeover.token, token)
      t.equal(await store.complete('scope-a', key, token, DONE, 60_000), false, 'the old token lost ownership')
      t.equal(await store.complete('scope-a', key, takeover.token, DONE, 60_000), true)
      t.equal((await store.begin('scope-a', key, FP, LONG)).kind, 'replay')
    })

    t.test('a dead owner that was sending: the in-flight marker expires and the next begin resolves the outcome', async (t) => {
      const store = await make(t)
      const key = fresh()
      const short = { ttlMs: 60_000, inFlightTtlMs: 60 }
      const token = await started(store, 'scope-a', key, short)
      t.equal(await store.markSending('scope-a', key, 'other', 10), false, 'only the owner marks')
      t.equal(await store.markSending('scope-a', key, token, 10), true)
      await sleep(100)
      const takeover = await store.begin('scope-a', key, FP, short)
      t.equal(takeover.kind, 'unknown-outcome')
      t.equal(await store.release('scope-a', key, token), false, 'the presumed-dead owner cannot release')
      t.equal(await store.markSending('scope-a', key, token, 10), false, 'nor mark')
      t.same(await store.begin('scope-a', key, OTHER_FP, short), { kind: 'mismatch' }, 'fingerprint kept')
      // The new owner resolves the outcome; if it dies too, or loses its writes, the first owner's
      // cancel may still have happened: the next one resolves again.
      await sleep(100)
      const second = await store.begin('scope-a', key, FP, short)
      t.equal(second.kind, 'unknown-outcome', 'the mark outlives a takeover')
      if (second.kind !== 'unknown-outcome') return
      t.equal(await store.markSending('scope-a', key, second.token, 10), true, 'the resolving owner may send')
    })

    t.test('the appointment\'s end and listed id, given as the cancel goes, reach whoever resolves its outcome', async (t) => {
      const store = await make(t)
      const short = { ttlMs: 60_000, inFlightTtlMs: 60 }
      const ENDS = 1_900_000_000_123
      const LISTED = '3f0b5d2e-8a41-4c1e-9f27-1a6d3c8e5b01'
      // Through an unknown outcome, and through the next owner's death as well.
      const key = fresh()
      const token = await started(store, 'scope-a', key, short)
      t.equal(await store.markSending('scope-a', key, token, 10, ENDS, LISTED), true)
      t.equal(await store.markUnknown('scope-a', key, token, 60_000), true)
      const first = await store.begin('scope-a', key, FP, short)
      t.same(first.kind === 'unknown-outcome' ? [first.endsAt, first.appointment] : 'no', [ENDS, LISTED])
      await sleep(100)
      const again = await store.begin('scope-a', key, FP, short)
      t.same(again.kind === 'unknown-outcome' ? [again.endsAt, again.appointment] : 'no', [ENDS, LISTED], 'kept through a takeover')
      if (again.kind !== 'unknown-outcome') return
      t.equal(await store.markSending('scope-a', key, again.token, 10), true, 'the resolving owner sends, knowing neither this time')
      t.equal(await store.markUnknown('scope-a', key, again.token, 60_000), true)
      const unnamed = await store.begin('scope-a', key, FP, short)
      t.same(unnamed.kind === 'unknown-outcome' ? [unnamed.endsAt, unnamed.appointment] : 'no', [null, null], 'each as the latest send named it')
      // Through a dead sender's takeover; and none when none was given.
      const other = fresh()
      const dead = await started(store, 'scope-a', other, short)
      t.equal(await store.markSending('scope-a', other, dead, 10), true)
      await sleep(100)
      const taken = await store.begin('scope-a', other, FP, short)
      t.same(taken.kind === 'unknown-outcome' ? [taken.endsAt, taken.appointment] : 'no', [null, null], 'not known')
      if (taken.kind !== 'unknown-outcome') return
      t.equal(await store.markSending('scope-a', other, taken.token, 10, ENDS, LISTED), true, 'the resolving owner sends, knowing them now')
      t.equal(await store.markUnknown('scope-a', other, taken.token, 60_000), true)
      const last = await store.begin('scope-a', other, FP, short)
      t.same(last.kind === 'unknown-outcome' ? [last.endsAt, last.appointment] : 'no', [ENDS, LISTED])
      if (last.kind !== 'unknown-outcome') return
      // Done: a retaken record (single flight's retry after an error) starts with neither.
      t.equal(await store.complete('scope-a', other, last.token, { statusCode: 502, body: {} }, 60_000), true)
      const retaken = await store.begin('scope-a', other, FP, { ...short, retakeFailed: true })
      t.equal(retaken.kind, 'started')
      if (retaken.kind !== 'started') return
      t.equal(await store.markSending('scope-a', other, retaken.token, 10), true)
      t.equal(await store.markUnknown('scope-a', other, retaken.token, 60_000), true)
      const after = await store.begin('scope-a', other, FP, short)
      t.same(after.kind === 'unknown-outcome' ? [after.endsAt, after.appointment] : 'no', [null, null], 'nothing of the done record\'s sender')
    })

    t.test('an unknown outcome taken over by an owner that dies: the next one resolves again', async (t) => {
      const store = await make(t)
      const key = fresh()
      const short = { ttlMs: 60_000, inFlightTtlMs: 60 }
      const token = await started(store, 'scope-a', key, short)
      t.equal(await store.markUnknown('scope-a', key, token, 60_000), true)
      t.equal((await store.begin('scope-a', key, FP, short)).kind, 'unknown-outcome')
      await sleep(100)
      t.equal((await store.begin('scope-a', key, FP, short)).kind, 'unknown-outcome')
    })

    t.test('a dead owner that never sent: the next begin starts afresh, fingerprint kept', async (t) => {
      const store = await make(t)
      const key = fresh()
      const short = { ttlMs: 60_000, inFlightTtlMs: 60 }
      const token = await started(store, 'scope-a', key, short)
      await sleep(100)
      t.same(await store.begin('scope-a', key, OTHER_FP, short), { kind: 'mismatch' })
      // The new owner's marker lives long: the next begin, however late a loaded machine runs it,
      // finds it in flight.
      const takeover = await store.begin('scope-a', key, FP, LONG)
      t.equal(takeover.kind, 'started')
      t.equal(await store.markSending('scope-a', key, token, 10), false, 'the presumed-dead owner lost the key')
      if (takeover.kind !== 'started') return
      t.not(takeover.token, token)
      t.equal((await store.begin('scope-a', key, FP, short)).kind, 'in-flight')
    })

    t.test('markSending holds the record for the send: no takeover while it runs', async (t) => {
      const store = await make(t)
      const key = fresh()
      const short = { ttlMs: 60_000, inFlightTtlMs: 60 }
      const token = await started(store, 'scope-a', key, short)
      t.equal(await store.markSending('scope-a', key, token, 400), true)
      await sleep(120)
      const retry = await store.begin('scope-a', key, FP, short)
      t.equal(retry.kind, 'in-flight', 'past the first marker, within the hold')
      if (retry.kind === 'in-flight') t.ok(retry.retryAfterMs > 60 && retry.retryAfterMs <= 400, `retry after the hold (${retry.retryAfterMs} ms)`)
      t.equal(await store.complete('scope-a', key, token, DONE, 60_000), true, 'the sender still owns it')

      const brief = fresh()
      const tokenB = await started(store, 'scope-a', brief, { ttlMs: 50, inFlightTtlMs: 50 })
      t.equal(await store.markSending('scope-a', brief, tokenB, 400), true)
      await sleep(150)
      t.equal((await store.begin('scope-a', brief, FP, short)).kind, 'in-flight', 'the record itself outlives a shorter life')
    })

    t.test('markSending is refused once the marker expired, even unchallenged', async (t) => {
      const store = await make(t)
      const key = fresh()
      const token = await started(store, 'scope-a', key, { ttlMs: 60_000, inFlightTtlMs: 30 })
      await sleep(60)
      t.equal(await store.markSending('scope-a', key, token, 10), false)
      t.equal(await store.markSending('scope-b', fresh(), token, 10), false, 'absent record')
    })

    t.test('a slow owner whose marker expired unchallenged may still complete', async (t) => {
      const store = await make(t)
      const key = fresh()
      const token = await started(store, 'scope-a', key, { ttlMs: 60_000, inFlightTtlMs: 30 })
      await sleep(60)
      t.equal(await store.complete('scope-a', key, token, DONE, 60_000), true)
    })

    t.test('records expire: completed, unknown, and the record life is at least the marker life', async (t) => {
      const store = await make(t)
      const done = fresh()
      const token = await started(store, 'scope-a', done)
      await store.complete('scope-a', done, token, DONE, 80)
      const unknown = fresh()
      const token2 = await started(store, 'scope-a', unknown)
      await store.markUnknown('scope-a', unknown, token2, 80)
      const held = fresh()
      await started(store, 'scope-a', held, { ttlMs: 10, inFlightTtlMs: 300 })
      await sleep(130)
      t.equal((await store.begin('scope-a', done, OTHER_FP, LONG)).kind, 'started', 'completed record gone')
      t.equal((await store.begin('scope-a', unknown, OTHER_FP, LONG)).kind, 'started', 'unknown record gone')
      t.equal((await store.begin('scope-a', held, FP, LONG)).kind, 'in-flight', 'marker outlives a shorter ttl')
    })

    t.test('scopes never share a key', async (t) => {
      const store = await make(t)
      const key = fresh()
      const tokenA = await started(store, 'scope-a', key)
      await store.complete('scope-a', key, tokenA, DONE, 60_000)
      t.equal((await store.begin('scope-b', key, OTHER_FP, LONG)).kind, 'started')
    })

    t.test('answers round-trip as data, not shared objects', async (t) => {
      const store = await make(t)
      const key = fresh()
      const token = await started(store, 'scope-a', key)
      const body = { status: 400, success: false, message: 'Invalid request', code: 'UPSTREAM_REJECTED', error: 'bad' }
      await store.complete('scope-a', key, token, { statusCode: 400, body }, 60_000)
      body.message = 'changed'
      const replay = await store.begin('scope-a', key, FP, LONG)
      t.same(replay.kind === 'replay' && replay.answer, { statusCode: 400, body: { ...body, message: 'Invalid request' } })
    })
  })
}

storeSuite('memory', async () => createMemoryIdempotencyStore())

const redisServer = await startRedis(t)
async function redisClient (t: Test, extra: Record<string, unknown> = {}): Promise<Redis> {
  const client = new Redis(redisServer.url, { enableOfflineQueue: false, maxRetriesPerRequest: 0, commandTimeout: 1000, ...extra })
  client.on('error', () => {})
  t.teardown(() => { client.disconnect() })
  await client.ping().catch(async () => { await new Promise((resolve) => client.once('ready', resolve)) })
  return client
}

storeSuite('redis', async (t) => createRedisIdempotencyStore({ redis: await redisClient(t) }))

t.test('redis: keys are hashed under a hash tag; nothing personal is stored', async (t) => {
  await redisServer.flush()
  const client = await redisClient(t)
  const store = createRedisIdempotencyStore({ redis: client })
  const key = 'patient@example.com-retry-1'
  const token = await started(store, 'scope-of-patient', key)
  t.equal(await store.markSending('scope-of-patient', key, token, 10), true)
  await store.complete('scope-of-patient', key, token, DONE, 60_000)
  const keys = await client.keys('*')
  t.equal(keys.length, 1)
  t.match(keys[0], /^idem:\{[0-9a-f]{32}\}:[0-9a-f]{32}$/)
  t.notOk(keys[0]?.includes('scope-of-patient'))
  const fields = await client.hgetall(keys[0] ?? '')
  t.same(Object.keys(fields).sort(), ['at', 'body', 'fp', 'state', 'status'])
  t.notOk(JSON.stringify(fields).includes('patient@example.com'))
  const prefixed = createRedisIdempotencyStore({ redis: client, prefix: 'test:idem:' })
  await started(prefixed, 'scope-of-patient', key)
  t.equal((await client.keys('test:idem:{*')).length, 1, 'prefix is configurable')
})

t.test('redis: a slow server fails the call within the client\'s command timeout', async (t) => {
  const client = await redisClient(t, { commandTimeout: 100 })
  const admin = await redisClient(t)
  const store = createRedisIdempotencyStore({ redis: client })
  await started(store, 'scope-a', fresh())
  await admin.call('CLIENT', 'PAUSE', '400', 'WRITE')
  const began = Date.now()
  await t.rejects(async () => await store.begin('scope-a', fresh(), FP, LONG), IdempotencyStoreError)
  t.ok(Date.now() - began < 350, 'did not wait for Redis')
  await sleep(350)
})

t.test('redis: errors become IdempotencyStoreError with the cause', async (t) => {
  const client = await redisClient(t)
  client.disconnect()
  const store = createRedisIdempotencyStore({ redis: client })
  const error = await (async () => await store.release('scope-a', 'k', 'token'))().catch((error: unknown) => error)
  t.type(error, IdempotencyStoreError)
  t.ok((error as Error).cause instanceof Error)
})

t.test('memory: expired records are swept and the store is bounded', async (t) => {
  let clock = 1_000
  const store = createMemoryIdempotencyStore({ now: () => clock, maxEntries: 3, sweepEveryMs: 1000 })
  for (const key of ['a', 'b', 'c']) await started(store, 's', key, { ttlMs: 100, inFlightTtlMs: 50 })
  t.equal(store.size(), 3)
  t.throws(() => store.begin('s', 'd', FP, LONG), IdempotencyStoreError, 'full of live records: refused at once, never evicted')
  clock += 200
  t.equal((await store.begin('s', 'd', FP, LONG)).kind, 'started', 'a full store sweeps first')
  t.equal(store.size(), 1)
  await started(store, 's', 'e', { ttlMs: 100, inFlightTtlMs: 50 })
  clock += 1000
  await store.begin('s', 'f', FP, LONG)
  t.equal(store.size(), 2, 'periodic sweep dropped the expired record')
})

t.test('memory: the in-flight marker and the record end exactly at their times to live', async (t) => {
  // As Redis does (its script: `until > now`; PEXPIRE): kills `record.until > at` -> `>=` in begin
  // and `record.expiresAt > at` -> `>=` in live (store.ts).
  let now = 1000
  const store = createMemoryIdempotencyStore({ now: () => now })
  const key = fresh()
  const token = await started(store, 'scope-a', key, { ttlMs: 500, inFlightTtlMs: 100 })
  now = 1099
  t.same(await store.begin('scope-a', key, FP, { ttlMs: 500, inFlightTtlMs: 100 }), { kind: 'in-flight', retryAfterMs: 1 }, 'in flight to its last millisecond')
  now = 1100
  t.equal(await store.markSending('scope-a', key, token, 100), false, 'the owner\'s marker has ended')
  t.equal((await store.begin('scope-a', key, FP, { ttlMs: 500, inFlightTtlMs: 100 })).kind, 'started', 'so another begin takes over at that very millisecond')

  const done = fresh()
  const owner = await started(store, 'scope-a', done)
  t.equal(await store.complete('scope-a', done, owner, DONE, 200), true)
  now = 1299
  t.equal((await store.begin('scope-a', done, FP, LONG)).kind, 'replay', 'replayed to the last millisecond')
  now = 1300
  t.equal((await store.begin('scope-a', done, FP, LONG)).kind, 'started', 'gone at its time to live')
})

t.test('memory: short-lived single-flight records do not pile up between sweeps (default interval)', async (t) => {
  let clock = 1_000
  const store = createMemoryIdempotencyStore({ now: () => clock })
  for (let i = 0; i < 1000; i++) {
    const begun = await store.begin('s', `flight-${i}`, FP, { ttlMs: 500, inFlightTtlMs: 500 })
    if (begun.kind === 'started') await store.complete('s', `flight-${i}`, begun.token, { statusCode: 200, body: { ok: true } }, 500)
  }
  t.equal(store.size(), 1000)
  clock += 1_100
  await store.begin('s', 'next', FP, LONG)
  t.equal(store.size(), 1, 'a second later they are gone')
})

t.test('idempotencyStoreFor picks memory without Redis and Redis with it', async (t) => {
  const memoryState: SharedState = { redis: null, mode: () => 'memory', degradeFor: () => {}, redisFor: () => 0, close: async () => {} }
  const memory = idempotencyStoreFor(memoryState)
  t.equal((await memory.begin('s', 'k', FP, LONG)).kind, 'started')
  const client = await redisClient(t, { commandTimeout: 100 })
  const degraded: number[] = []
  const redisState: SharedState = { redis: client, mode: () => 'redis', degradeFor: (ms) => { degraded.push(ms) }, redisFor: () => Infinity, close: async () => {} }
  const shared = idempotencyStoreFor(redisState)
  const key = fresh()
  await shared.begin('s', key, FP, LONG)
  t.equal((await createRedisIdempotencyStore({ redis: client }).begin('s', key, FP, LONG)).kind, 'in-flight', 'it is the Redis store')
  t.same(degraded, [])
  // A command that times out on the connected client: the shared state says degraded for a while.
  const admin = await redisClient(t)
  await admin.call('CLIENT', 'PAUSE', '300', 'WRITE')
  await t.rejects(async () => await shared.begin('s', fresh(), FP, LONG), IdempotencyStoreError)
  t.same(degraded, [1000], 'the shared state hears of it')
  await sleep(300)
})

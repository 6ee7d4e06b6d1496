import t, { type Test } from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { startRedis, redisClient } from '../helpers/redis.js'
import { ErrorCode } from '../../src/errors.js'
import { createIdempotency, createMemoryIdempotencyStore, createRedisIdempotencyStore, type HandleInput } from '../../src/idempotency/index.js'
import { createSingleFlight, errorSummary, type SingleFlightOptions } from '../../src/idempotency/single-flight.js'
import type { IdempotencyStore } from '../../src/idempotency/store.js'
import { RepeatedWarnings } from '../../src/state/notice.js'
import { APPOINTMENT, CANCELLED, EMAIL, OTHER_EMAIL, REASON, deferred, fakeCancel, scopeOf, upstreamError, type FakeCancel } from './fakes.js'

const SCOPE = scopeOf(EMAIL)
const FP = 'f'.repeat(64)

const redisServer = await startRedis(t)

async function redisStore (t: Test): Promise<IdempotencyStore> {
  const client = redisClient(redisServer.url, { enableOfflineQueue: false, maxRetriesPerRequest: 0, commandTimeout: 1000 })
  t.teardown(() => { client.disconnect() })
  await new Promise((resolve) => client.once('ready', resolve))
  return createRedisIdempotencyStore({ redis: client })
}

function keyless (cancel: FakeCancel, overrides: Partial<HandleInput> = {}): HandleInput {
  return {
    scope: SCOPE,
    key: undefined,
    appointmentId: APPOINTMENT,
    reason: REASON,
    run: cancel.run,
    resolveUnknown: async () => { throw new Error('not used without a key') },
    ...overrides
  }
}

t.test('in process: overlapping identical cancels without a key share one upstream call', async (t) => {
  const idem = createIdempotency({ store: createMemoryIdempotencyStore(), inFlightTtlMs: 5000 })
  const cancel = fakeCancel({ delayMs: 30 })
  const results = await Promise.all(Array.from({ length: 5 }, () => idem.handle(keyless(cancel))))
  t.equal(cancel.sends(), 1)
  t.same(results.map((result) => result.earlier), [null, 'shared', 'shared', 'shared', 'shared'], 'one sent, four got its answer')
  for (const result of results) t.same(result.answer, CANCELLED)
  // Different reason, or another patient: not the same request.
  await Promise.all([
    idem.handle(keyless(cancel, { reason: 'other' })),
    idem.handle(keyless(cancel, { scope: scopeOf(OTHER_EMAIL) })),
    idem.handle(keyless(cancel, { reason: undefined }))
  ])
  t.equal(cancel.sends(), 4)
})

t.test('in process: followers share the leader\'s error too', async (t) => {
  const flight = createSingleFlight({ store: createMemoryIdempotencyStore(), inFlightTtlMs: 5000 })
  const cancel = fakeCancel({ delayMs: 20, cancel: [async () => { throw upstreamError('unknown') }] })
  const results = await Promise.allSettled([flight.runOnce(SCOPE, FP, cancel.run), flight.runOnce(SCOPE, FP, cancel.run)])
  t.equal(cancel.sends(), 1)
  t.ok(results.every((result) => result.status === 'rejected' && (result.reason as { code: string }).code === ErrorCode.UPSTREAM_TIMEOUT))
})

t.test('in process: a shared answer says so', async (t) => {
  const flight = createSingleFlight({ store: createMemoryIdempotencyStore(), inFlightTtlMs: 5000 })
  const cancel = fakeCancel({ delayMs: 20 })
  const [leader, follower] = await Promise.all([flight.runOnce(SCOPE, FP, cancel.run), flight.runOnce(SCOPE, FP, cancel.run)])
  t.equal(leader.shared, false)
  t.equal(follower.shared, true)
})

t.test('one process (replicated: false): key-less cancels meet in memory, without a store call; keyed ones use the store', async (t) => {
  const memory = createMemoryIdempotencyStore()
  const begun: string[] = []
  const counting: IdempotencyStore = { ...memory, begin: (scope, key, fingerprint, options) => { begun.push(key.split('\0')[0] as string); return memory.begin(scope, key, fingerprint, options) } }
  const idem = createIdempotency({ store: counting, replicated: false, inFlightTtlMs: 5000 })
  const cancel = fakeCancel({ delayMs: 20 })
  const results = await Promise.all([idem.handle(keyless(cancel)), idem.handle(keyless(cancel))])
  t.same(results.map((result) => result.earlier), [null, 'shared'])
  t.equal(cancel.sends(), 1)
  t.same(begun, [], 'no store call for a key-less cancel')
  await idem.handle(keyless(cancel, { key: 'k1' }))
  t.same(begun, ['key'], 'a keyed cancel still asks the store')
})

t.test('one process, no store: overlapping cancels share the leader, and a late double tap its answer for shareTtlMs', async (t) => {
  let clock = 1_000
  const flight = createSingleFlight({ store: null, inFlightTtlMs: 5000, shareTtlMs: 500, now: () => clock })
  const cancel = fakeCancel({ delayMs: 20 })
  const overlapping = await Promise.all([flight.runOnce(SCOPE, FP, cancel.run), flight.runOnce(SCOPE, FP, cancel.run)])
  t.same(overlapping.map((result) => result.shared), [false, true])
  t.equal(cancel.sends(), 1)
  clock += 499
  t.same(await flight.runOnce(SCOPE, FP, cancel.run), { answer: CANCELLED, shared: true }, 'just after: the same answer')
  t.equal(cancel.sends(), 1)
  clock += 1
  t.same(await flight.runOnce(SCOPE, FP, cancel.run), { answer: CANCELLED, shared: false }, 'once shareTtlMs has passed: a new request')
  t.equal(cancel.sends(), 2)
  const other = 'e'.repeat(64)
  clock = 1_900
  t.same((await flight.runOnce(SCOPE, other, cancel.run)).shared, false, 'another request')
  clock = 2_100
  t.same((await flight.runOnce(SCOPE, other, cancel.run)).shared, true, 'kept across a change of generation')
  clock = 5_000
  t.same((await flight.runOnce(SCOPE, other, cancel.run)).shared, false, 'both generations gone')
  t.equal(cancel.sends(), 4)
})

t.test('one process, no store: after the leader, only a 200 is kept for a late double tap; after an error the next request runs', async (t) => {
  const flight = createSingleFlight({ store: null, inFlightTtlMs: 5000 })
  const outcomes: Array<[string, () => Promise<never>]> = [
    ['an answered upstream error', async () => { throw upstreamError('answered', 502, ErrorCode.UPSTREAM_ERROR) }],
    ['an unknown outcome', async () => { throw upstreamError('unknown') }],
    ['nothing sent', async () => { throw upstreamError('not-sent', 502, ErrorCode.UPSTREAM_UNAVAILABLE) }],
    ['our own bug', async () => { throw new TypeError('bug') }]
  ]
  for (const [label, step] of outcomes) {
    const fingerprint = label.replace(/\W/g, '-')
    const failing = fakeCancel({ cancel: [step] })
    await t.rejects(flight.runOnce(SCOPE, fingerprint, failing.run), Error, `${label}: the leader gets the error`)
    const again = fakeCancel()
    const next = await flight.runOnce(SCOPE, fingerprint, again.run)
    t.same(next, { answer: CANCELLED, shared: false }, `${label}: a retry just after runs, and gets its own answer`)
    t.equal(again.sends(), 1)
  }
  const missing = fakeCancel({ cancel: [async () => ({ statusCode: 404, body: { status: 404, success: false, message: 'not found', code: ErrorCode.APPOINTMENT_NOT_FOUND } })] })
  t.equal((await flight.runOnce(SCOPE, 'missing', missing.run)).answer.statusCode, 404)
  t.equal((await flight.runOnce(SCOPE, 'missing', fakeCancel().run)).shared, false, 'nor a 404')
  const done = fakeCancel()
  await flight.runOnce(SCOPE, 'done', done.run)
  t.same(await flight.runOnce(SCOPE, 'done', fakeCancel().run), { answer: CANCELLED, shared: true }, 'a 200 is kept')
})

function twoReplicas (store1: IdempotencyStore, store2: IdempotencyStore, extra: Partial<SingleFlightOptions> = {}) {
  const options = { inFlightTtlMs: 2000, pollMs: 10, ...extra }
  return [createSingleFlight({ store: store1, ...options }), createSingleFlight({ store: store2, ...options })] as const
}

t.test('across replicas on Redis: identical cancels share one upstream call', async (t) => {
  await redisServer.flush()
  const a = createIdempotency({ store: await redisStore(t), inFlightTtlMs: 2000, pollMs: 10 })
  const b = createIdempotency({ store: await redisStore(t), inFlightTtlMs: 2000, pollMs: 10 })
  const cancel = fakeCancel({ delayMs: 50 })
  const results = await Promise.all([a, b, a, b].map((idem) => idem.handle(keyless(cancel))))
  t.equal(cancel.sends(), 1)
  for (const result of results) t.same(result.answer.body, CANCELLED.body)
})

t.test('across replicas: an upstream error answer is shared with followers', async (t) => {
  await redisServer.flush()
  const [a, b] = twoReplicas(await redisStore(t), await redisStore(t))
  const cancel = fakeCancel({ delayMs: 50, cancel: [async () => { throw upstreamError('unknown') }] })
  const leader = a.runOnce(SCOPE, FP, cancel.run)
  leader.catch(() => {})
  await sleep(15)
  const follower = await b.runOnce(SCOPE, FP, cancel.run)
  await t.rejects(leader, { code: ErrorCode.UPSTREAM_TIMEOUT })
  t.equal(follower.shared, true)
  t.equal(follower.answer.statusCode, 504)
  t.match(follower.answer.body, { code: ErrorCode.UPSTREAM_TIMEOUT })
  t.equal(cancel.sends(), 1)
})

t.test('across replicas: a request that comes after a leader\'s error runs again; after its 200 it shares it', async (t) => {
  await redisServer.flush()
  const [a, b] = twoReplicas(await redisStore(t), await redisStore(t))
  const failing = fakeCancel({ cancel: [async () => { throw upstreamError('answered', 502, ErrorCode.UPSTREAM_ERROR) }] })
  await t.rejects(a.runOnce(SCOPE, FP, failing.run), { code: ErrorCode.UPSTREAM_ERROR })
  const retry = fakeCancel()
  t.same(await b.runOnce(SCOPE, FP, retry.run), { answer: CANCELLED, shared: false }, 'the retry on the other replica gets its own answer')
  t.equal(retry.sends(), 1)
  const other = 'e'.repeat(64)
  await a.runOnce(SCOPE, other, fakeCancel().run)
  const tap = fakeCancel()
  t.same(await b.runOnce(SCOPE, other, tap.run), { answer: CANCELLED, shared: true }, 'a double tap just after a 200 gets it')
  t.equal(tap.sends(), 0)
})

t.test('across replicas: identical retries after a leader\'s error, on two replicas, send one cancel', async (t) => {
  await redisServer.flush()
  const [a, b] = twoReplicas(await redisStore(t), await redisStore(t))
  const [c] = twoReplicas(await redisStore(t), await redisStore(t))
  const failing = fakeCancel({ cancel: [async () => { throw upstreamError('answered', 502, ErrorCode.UPSTREAM_ERROR) }] })
  await t.rejects(a.runOnce(SCOPE, FP, failing.run), { code: ErrorCode.UPSTREAM_ERROR })
  const retry = fakeCancel({ delayMs: 50 })
  const [first, second] = await Promise.all([b.runOnce(SCOPE, FP, retry.run), c.runOnce(SCOPE, FP, retry.run)])
  t.equal(retry.sends(), 1, 'one cancel for both retries')
  t.same([first.answer, second.answer], [CANCELLED, CANCELLED])
  t.same([first.shared, second.shared].sort(), [false, true], 'one led, the other followed it')
})

t.test('across replicas: a leader that sent nothing lets a waiting follower try itself', async (t) => {
  await redisServer.flush()
  const [a, b] = twoReplicas(await redisStore(t), await redisStore(t))
  const failing = fakeCancel({ delayMs: 40, cancel: [async () => { throw upstreamError('not-sent', 502, ErrorCode.UPSTREAM_UNAVAILABLE) }] })
  const ok = fakeCancel()
  const leader = a.runOnce(SCOPE, FP, failing.run)
  leader.catch(() => {})
  await sleep(10)
  const follower = await b.runOnce(SCOPE, FP, ok.run)
  await t.rejects(leader)
  t.same(follower, { answer: CANCELLED, shared: false })
  t.equal(ok.sends(), 1)
})

t.test('across replicas: 429s and our bugs release the marker', async (t) => {
  const store = createMemoryIdempotencyStore()
  const [a] = twoReplicas(store, store)
  const limited = fakeCancel({ cancel: [async () => ({ statusCode: 429, body: { status: 429 } })] })
  await a.runOnce(SCOPE, FP, limited.run)
  const buggy = fakeCancel({ cancel: [async () => { throw new TypeError('bug') }] })
  await t.rejects(a.runOnce(SCOPE, FP, buggy.run), TypeError)
  const ok = fakeCancel()
  t.same(await a.runOnce(SCOPE, FP, ok.run), { answer: CANCELLED, shared: false }, 'nothing pinned')
})

t.test('across replicas: a follower waits a bounded time, then 409', async (t) => {
  const store = createMemoryIdempotencyStore()
  const [a, b] = twoReplicas(store, store, { waitMs: 60 })
  const gate = deferred<void>()
  const slow = fakeCancel({ before: async () => { await gate.promise } })
  const leader = a.runOnce(SCOPE, FP, slow.run)
  const began = Date.now()
  await t.rejects(b.runOnce(SCOPE, FP, slow.run), { statusCode: 409, code: ErrorCode.IDEMPOTENCY_IN_FLIGHT, headers: { 'Retry-After': '2' } })
  t.ok(Date.now() - began < 500)
  gate.resolve()
  await leader
  t.equal(slow.sends(), 1)
})

t.test('across replicas: a dead leader\'s marker expires and a follower takes over', async (t) => {
  const store = createMemoryIdempotencyStore()
  const [a, b] = twoReplicas(store, store, { inFlightTtlMs: 50 })
  a.runOnce(SCOPE, FP, fakeCancel({ cancel: [async () => await new Promise(() => {})] }).run).catch(() => {})
  await sleep(5)
  const ok = fakeCancel()
  t.same(await b.runOnce(SCOPE, FP, ok.run), { answer: CANCELLED, shared: false })
})

t.test('across replicas, shutting down: a follower whose leader died hands the lead back (503, nothing sent), and a replica that stays leads at once', async (t) => {
  const store = createMemoryIdempotencyStore()
  const [dying] = twoReplicas(store, store, { inFlightTtlMs: 50 })
  const [stopping] = twoReplicas(store, store, { inFlightTtlMs: 50, stopping: () => true })
  const [staying] = twoReplicas(store, store, { inFlightTtlMs: 5000 })
  dying.runOnce(SCOPE, FP, fakeCancel({ cancel: [async () => await new Promise(() => {})] }).run).catch(() => {})
  await sleep(5)
  const handed = fakeCancel()
  await t.rejects(stopping.runOnce(SCOPE, FP, handed.run), { statusCode: 503, code: ErrorCode.SERVICE_UNAVAILABLE, headers: { 'Retry-After': '1' } })
  t.equal(handed.sends(), 0, 'the stopping replica sends nothing')
  const retried = fakeCancel()
  const began = Date.now()
  t.same(await staying.runOnce(SCOPE, FP, retried.run), { answer: CANCELLED, shared: false }, 'the retry leads on a replica that stays')
  t.ok(Date.now() - began < 1000, 'at once: the record was given back, not left in flight for its lifetime')
  t.equal(retried.sends(), 1)
})

t.test('shutting down: a request that finds no leader leads as usual', async (t) => {
  const store = createMemoryIdempotencyStore()
  const [stopping] = twoReplicas(store, store, { stopping: () => true })
  const cancel = fakeCancel()
  t.same(await stopping.runOnce(SCOPE, FP, cancel.run), { answer: CANCELLED, shared: false })
  t.equal(cancel.sends(), 1)
})

t.test('across replicas: a finished leader\'s answer stays for shareTtlMs, a 200 and an error alike', async (t) => {
  let clock = 1_000
  const store = createMemoryIdempotencyStore({ now: () => clock })
  const [a, b] = twoReplicas(store, store, { shareTtlMs: 500, pollMs: 50 })
  await a.runOnce(SCOPE, FP, fakeCancel().run)
  clock += 499
  const tap = fakeCancel()
  t.same(await b.runOnce(SCOPE, FP, tap.run), { answer: CANCELLED, shared: true }, 'a double tap just after the 200 gets it')
  clock += 1
  t.same(await b.runOnce(SCOPE, FP, tap.run), { answer: CANCELLED, shared: false }, 'shareTtlMs after it: a new request')
  t.equal(tap.sends(), 1)

  // A follower waiting for a leader that fails: the error is there for it for shareTtlMs only.
  const other = 'e'.repeat(64)
  const gate = deferred<void>()
  const failing = fakeCancel({ before: async () => { await gate.promise }, cancel: [async () => { throw upstreamError('answered', 502, ErrorCode.UPSTREAM_ERROR) }] })
  const leader = a.runOnce(SCOPE, other, failing.run)
  leader.catch(() => {})
  const retry = fakeCancel()
  const follower = b.runOnce(SCOPE, other, retry.run)
  await sleep(10)
  gate.resolve()
  await t.rejects(leader, { code: ErrorCode.UPSTREAM_ERROR })
  // Before the follower looks again (every 50 ms), the error's time is up.
  clock += 500
  t.same(await follower, { answer: CANCELLED, shared: false }, 'looking after shareTtlMs, the follower runs itself')
  t.equal(retry.sends(), 1)
})

t.test('across replicas: a follower never sleeps past its wait, nor past the leader\'s marker', async (t) => {
  const store = createMemoryIdempotencyStore()
  // Polls far apart: the follower still answers when its wait ends...
  const [a, b] = twoReplicas(store, store, { inFlightTtlMs: 10_000, waitMs: 60, pollMs: 2000 })
  const gate = deferred<void>()
  const slow = fakeCancel({ before: async () => { await gate.promise } })
  const leader = a.runOnce(SCOPE, FP, slow.run)
  let began = Date.now()
  await t.rejects(b.runOnce(SCOPE, FP, slow.run), { statusCode: 409, code: ErrorCode.IDEMPOTENCY_IN_FLIGHT })
  t.ok(Date.now() - began < 1000, `409 once the wait is over (${Date.now() - began} ms), not after a poll interval`)
  gate.resolve()
  await leader
  // ...and takes over once a dead leader's marker expires.
  const [c, d] = twoReplicas(store, store, { inFlightTtlMs: 60, waitMs: 1000, pollMs: 2000 })
  const other = 'e'.repeat(64)
  c.runOnce(SCOPE, other, fakeCancel({ cancel: [async () => await new Promise(() => {})] }).run).catch(() => {})
  await sleep(5)
  began = Date.now()
  t.same(await d.runOnce(SCOPE, other, fakeCancel().run), { answer: CANCELLED, shared: false })
  t.ok(Date.now() - began < 1000, `led once the marker expired (${Date.now() - began} ms), not after a poll interval`)
})

t.test('store unavailable: a key-less cancel proceeds with the in-process single flight', async (t) => {
  const broken: IdempotencyStore = {
    begin: async () => { throw new Error('redis down') },
    complete: async () => true,
    markSending: async () => true,
    markUnknown: async () => true,
    release: async () => true
  }
  const warnings: string[] = []
  const flight = createSingleFlight({ store: broken, inFlightTtlMs: 1000, log: { warn: (_object, message) => warnings.push(message) } })
  const cancel = fakeCancel({ delayMs: 20 })
  const results = await Promise.all([flight.runOnce(SCOPE, FP, cancel.run), flight.runOnce(SCOPE, FP, cancel.run)])
  t.equal(cancel.sends(), 1)
  t.same(results.map((result) => result.shared), [false, true])
  t.same(warnings, ['idempotency store unavailable: single flight is per process'])
  const quiet = createSingleFlight({ store: broken, inFlightTtlMs: 1000 })
  t.same(await quiet.runOnce(SCOPE, FP, cancel.run), { answer: CANCELLED, shared: false }, 'no logger: silent')
})

t.test('a store failing at once (a full memory store, a synchronous bug) is treated as one failing later', async (t) => {
  const warnings: string[] = []
  const full = createMemoryIdempotencyStore({ maxEntries: 0 })
  const flight = createSingleFlight({ store: full, inFlightTtlMs: 1000, log: { warn: (_object, message) => warnings.push(message) } })
  const cancel = fakeCancel()
  t.same(await flight.runOnce(SCOPE, FP, cancel.run), { answer: CANCELLED, shared: false }, 'a full store: the cancel still runs')
  t.equal(cancel.sends(), 1)
  t.same(warnings, ['idempotency store unavailable: single flight is per process'])

  warnings.length = 0
  const memory = createMemoryIdempotencyStore()
  const throwing: IdempotencyStore = {
    begin: memory.begin,
    complete: () => { throw new Error('complete broke') },
    markSending: memory.markSending,
    markUnknown: memory.markUnknown,
    release: () => { throw new Error('release broke') }
  }
  const writes = createSingleFlight({ store: throwing, inFlightTtlMs: 1000, log: { warn: (_object, message) => warnings.push(message) } })
  t.same(await writes.runOnce(SCOPE, FP, fakeCancel().run), { answer: CANCELLED, shared: false }, 'a failed write never fails the answer')
  t.same(warnings, ['idempotency store write failed'])
})

t.test('writes failing during an outage are told once a minute, keyed and key-less cancels together, not once per cancel', async (t) => {
  const warnings: Array<{ fields: object, message: string }> = []
  const log = { warn: (fields: object, message: string) => { warnings.push({ fields, message }) } }
  const memory = createMemoryIdempotencyStore()
  const failingWrites: IdempotencyStore = {
    begin: memory.begin,
    complete: async () => { throw new Error('complete broke') },
    markSending: memory.markSending,
    markUnknown: memory.markUnknown,
    release: async () => { throw new Error('release broke') }
  }
  let now = 0
  const idem = createIdempotency({ store: failingWrites, inFlightTtlMs: 1000, log, warnings: new RepeatedWarnings(60_000, () => now) })
  const cancel = fakeCancel()
  for (let i = 0; i < 3; i++) {
    t.same(await idem.handle(keyless(cancel, { appointmentId: `appointment-${i}` })), { answer: CANCELLED, earlier: null }, 'a key-less cancel')
    t.same(await idem.handle(keyless(cancel, { appointmentId: `keyed-${i}`, key: `key-${i}` })), { answer: CANCELLED, earlier: null }, 'a keyed cancel')
  }
  t.equal(cancel.sends(), 6, 'every cancel was sent')
  t.same(warnings.map(({ message }) => message), ['idempotency store write failed'], 'six failed writes, one line')
  now = 60_000
  await idem.handle(keyless(cancel, { appointmentId: 'a-minute-later' }))
  t.same(warnings.map(({ message }) => message), ['idempotency store write failed', 'idempotency store write failed'], 'a minute later, the next')
  t.match(warnings[1]!.fields, { err: { message: 'complete broke' }, repeats: 5 }, 'counting the five left out')
  const alone = createIdempotency({ store: failingWrites, inFlightTtlMs: 1000, log })
  warnings.length = 0
  await alone.handle(keyless(cancel, { appointmentId: 'b' }))
  await alone.handle(keyless(cancel, { appointmentId: 'c', key: 'key-c' }))
  t.same(warnings.map(({ message }) => message), ['idempotency store write failed'], 'without the app\'s warnings, its own: once too')
})

t.test('without the app\'s warnings, a single flight\'s own tell a store failure once a minute', async (t) => {
  const broken: IdempotencyStore = { ...createMemoryIdempotencyStore(), begin: async () => { throw new Error('redis down') } }
  const warnings: string[] = []
  let now = 0
  const flight = createSingleFlight({ store: broken, inFlightTtlMs: 1000, log: { warn: (_object, message) => warnings.push(message) }, now: () => now })
  await flight.runOnce(SCOPE, 'a'.repeat(64), fakeCancel().run)
  now = 59_999
  await flight.runOnce(SCOPE, 'b'.repeat(64), fakeCancel().run)
  t.equal(warnings.length, 1, 'within the minute: told once')
  now = 60_000
  await flight.runOnce(SCOPE, 'c'.repeat(64), fakeCancel().run)
  t.equal(warnings.length, 2, 'a minute on: told again')
})

t.test('errorSummary never carries more than the error\'s name and message', async (t) => {
  t.same(errorSummary(new RangeError('x')), { type: 'RangeError', message: 'x' })
  t.same(errorSummary('text'), { type: 'string', message: 'text' })
})

import t, { type Test } from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis } from 'ioredis'
import { startRedis } from '../helpers/redis.js'
import { ApiError, ErrorCode } from '../../src/errors.js'
import {
  createIdempotency,
  createMemoryIdempotencyStore,
  createRedisIdempotencyStore,
  inFlightTtlFor,
  parseIdempotencyKey,
  requestFingerprint,
  REPLAY_TTL_MS,
  type HandleInput,
  type IdempotencyStore,
  type Idempotency,
  type Run
} from '../../src/idempotency/index.js'
import {
  APPOINTMENT, CANCELLED, EMAIL, OTHER_APPOINTMENT, OTHER_EMAIL, REASON,
  deferred, fakeCancel, notFound, scopeOf, upstreamError, type FakeCancel
} from './fakes.js'

type UpstreamErrorLike = ReturnType<typeof upstreamError>

const SCOPE = scopeOf(EMAIL)

function input (cancel: FakeCancel, overrides: Partial<HandleInput> = {}): HandleInput {
  return {
    scope: SCOPE,
    key: 'retry-key-1',
    appointmentId: APPOINTMENT,
    reason: REASON,
    run: cancel.run,
    resolveUnknown: async () => { throw new Error('resolveUnknown not expected') },
    ...overrides
  }
}

async function rejection (promise: Promise<unknown>): Promise<ApiError> {
  const error = await promise.then(() => null, (error: unknown) => error)
  if (!(error instanceof ApiError)) throw new Error(`expected an ApiError, got ${String(error)}`)
  return error
}

const redisServer = await startRedis(t)

async function redisClient (t: Test): Promise<Redis> {
  const client = new Redis(redisServer.url, { enableOfflineQueue: false, maxRetriesPerRequest: 0, commandTimeout: 1000 })
  client.on('error', () => {})
  t.teardown(() => { client.disconnect() })
  await new Promise((resolve) => client.once('ready', resolve))
  return client
}

type MakeStore = (t: Test) => Promise<IdempotencyStore>
const stores: Array<[string, MakeStore]> = [
  ['memory', async () => createMemoryIdempotencyStore()],
  ['redis', async (t) => createRedisIdempotencyStore({ redis: await redisClient(t) })]
]

for (const [name, makeStore] of stores) {
  async function make (t: Test, inFlightTtlMs = 5000): Promise<Idempotency> {
    if (name === 'redis') await redisServer.flush()
    return createIdempotency({ store: await makeStore(t), inFlightTtlMs })
  }

  t.test(`${name}: a retry after success replays the answer without calling the upstream`, async (t) => {
    const idem = await make(t)
    const cancel = fakeCancel()
    const first = await idem.handle(input(cancel))
    t.same(first, { answer: CANCELLED, earlier: null })
    const second = await idem.handle(input(cancel))
    t.equal(second.earlier, 'replayed')
    t.equal(second.answer.statusCode, 200)
    t.same(second.answer.body, CANCELLED.body)
    t.same(second.answer.headers, { 'idempotent-replayed': 'true' })
    t.equal(cancel.runs(), 1)
    t.equal(cancel.sends(), 1)
  })

  t.test(`${name}: the same key with another appointment or reason is a mismatch`, async (t) => {
    const idem = await make(t)
    const cancel = fakeCancel()
    await idem.handle(input(cancel))
    const variants: Array<Partial<HandleInput>> = [
      { appointmentId: OTHER_APPOINTMENT },
      { reason: 'Another reason' },
      { reason: undefined },
      { reason: '' }
    ]
    for (const variant of variants) {
      const error = await rejection(idem.handle(input(cancel, variant)))
      t.equal(error.statusCode, 422)
      t.equal(error.code, ErrorCode.IDEMPOTENCY_MISMATCH)
    }
    // Absent and empty reasons differ from each other too.
    await idem.handle(input(cancel, { key: 'absent-reason', reason: undefined }))
    t.equal((await rejection(idem.handle(input(cancel, { key: 'absent-reason', reason: '' })))).statusCode, 422)
    t.equal((await idem.handle(input(cancel, { key: 'absent-reason', reason: undefined }))).earlier, 'replayed')
    // The appointment id compares case-insensitively, as UUIDs do.
    t.equal((await idem.handle(input(cancel, { appointmentId: APPOINTMENT.toUpperCase() }))).earlier, 'replayed')
    t.equal(cancel.runs(), 2)
  })

  t.test(`${name}: a request while the first is in flight gets 409 with Retry-After`, async (t) => {
    const idem = await make(t)
    const gate = deferred<void>()
    const cancel = fakeCancel({ before: async () => { await gate.promise } })
    const first = idem.handle(input(cancel))
    await sleep(20)
    const error = await rejection(idem.handle(input(cancel)))
    t.equal(error.statusCode, 409)
    t.equal(error.code, ErrorCode.IDEMPOTENCY_IN_FLIGHT)
    // Soon (the first usually answers within a second), not the marker's whole lifetime (17 s).
    t.match(error.headers, { 'Retry-After': /^[12]$/ })
    gate.resolve()
    t.equal((await first).answer.statusCode, 200)
    t.equal(cancel.runs(), 1)
  })

  t.test(`${name}: two patients using the same key do not interfere`, async (t) => {
    const idem = await make(t)
    const cancel = fakeCancel()
    await idem.handle(input(cancel))
    const other = await idem.handle(input(cancel, { scope: scopeOf(OTHER_EMAIL), appointmentId: OTHER_APPOINTMENT, reason: undefined }))
    t.equal(other.earlier, null)
    t.equal(cancel.runs(), 2)
    t.equal((await idem.handle(input(cancel))).earlier, 'replayed')
  })

  t.test(`${name}: 429s and failures that sent nothing release the key`, async (t) => {
    const idem = await make(t)
    const cases: Array<[string, FakeCancel]> = [
      ['upstream 429 thrown', fakeCancel({ cancel: [async () => { throw upstreamError('answered', 429, ErrorCode.UPSTREAM_RATE_LIMITED) }, async () => CANCELLED] })],
      ['429 answered', fakeCancel({ cancel: [async () => ({ statusCode: 429, body: { status: 429 } }), async () => CANCELLED] })],
      ['not sent', fakeCancel({ cancel: [async () => { throw upstreamError('not-sent', 502, ErrorCode.UPSTREAM_UNAVAILABLE) }, async () => CANCELLED] })]
    ]
    for (const [label, cancel] of cases) {
      const key = `release-${label}`
      await idem.handle(input(cancel, { key })).catch(() => {})
      const retry = await idem.handle(input(cancel, { key, reason: 'a different reason is fine: the key is free' }))
      t.equal(retry.earlier, null, label)
      t.equal(cancel.sends(), 2, `${label}: sent again`)
    }
  })

  t.test(`${name}: failures before the cancel (ownership fetch, budget, our bugs) release the key`, async (t) => {
    const idem = await make(t)
    const failures = [
      () => upstreamError('answered', 502, ErrorCode.UPSTREAM_ERROR),
      () => upstreamError('unknown', 504, ErrorCode.UPSTREAM_TIMEOUT),
      () => new ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, 'budget store down'),
      () => new TypeError('a bug of ours')
    ]
    for (const [index, failure] of failures.entries()) {
      let fail = true
      const cancel = fakeCancel({ before: async () => { if (fail) throw failure() } })
      const key = `before-${index}`
      await t.rejects(idem.handle(input(cancel, { key })))
      fail = false
      t.equal((await idem.handle(input(cancel, { key }))).earlier, null)
      t.equal(cancel.sends(), 1, 'the cancel was sent once, on the retry')
    }
  })

  t.test(`${name}: upstream answers and the ownership 404 are stored and replayed`, async (t) => {
    const idem = await make(t)
    const rejected = fakeCancel({ cancel: [async () => { throw upstreamError('answered', 400, ErrorCode.UPSTREAM_REJECTED) }] })
    const first = await rejection(idem.handle(input(rejected, { key: 'rejected' })))
    t.equal(first.statusCode, 400)
    const replay = await idem.handle(input(rejected, { key: 'rejected' }))
    t.same(replay.answer.body, first.toEnvelope())
    t.equal(replay.answer.statusCode, 400)
    t.equal(replay.earlier, 'replayed')
    t.equal(rejected.sends(), 1)

    const notOwned = fakeCancel({ before: async () => { throw notFound() } })
    await t.rejects(idem.handle(input(notOwned, { key: 'not-owned' })), { statusCode: 404, code: ErrorCode.APPOINTMENT_NOT_FOUND })
    const replay404 = await idem.handle(input(notOwned, { key: 'not-owned' }))
    t.same(replay404.answer, { statusCode: 404, body: notFound().toEnvelope(), headers: { 'idempotent-replayed': 'true' } })
    t.equal(notOwned.runs(), 1)
    t.equal(notOwned.sends(), 0)
  })

  t.test(`${name}: lost answer, retry, upstream shows it cancelled: 200 confirmed, never sent again`, async (t) => {
    const idem = await make(t)
    const cancel = fakeCancel({ cancel: [async () => { throw upstreamError('unknown') }] })
    let resolves = 0
    const resolveUnknown = async (): Promise<'cancelled'> => { resolves += 1; return 'cancelled' }
    const first = await rejection(idem.handle(input(cancel, { resolveUnknown })))
    t.equal(first.code, ErrorCode.UPSTREAM_TIMEOUT)
    const retry = await idem.handle(input(cancel, { resolveUnknown }))
    t.equal(retry.answer.statusCode, 200)
    t.match(retry.answer.body, { status: 200, success: true, message: /confirmed/ })
    t.equal(retry.earlier, 'confirmed', 'a confirmation is not a cancel of its own')
    t.equal(resolves, 1)
    const again = await idem.handle(input(cancel, { resolveUnknown }))
    t.equal(again.earlier, 'replayed', 'the confirmation is now the stored answer')
    t.same(again.answer.body, retry.answer.body)
    t.equal(cancel.sends(), 1)
    t.equal(resolves, 1)
    t.equal((await rejection(idem.handle(input(cancel, { reason: undefined })))).statusCode, 422, 'the fingerprint was kept')
  })

  t.test(`${name}: an unknown outcome is resolved knowing the appointment's end and listed id, as its attempt named them (null when none)`, async (t) => {
    const idem = await make(t)
    const ENDS = 1_900_000_000_000
    const LISTED = '3f0b5d2e-8a41-4c1e-9f27-1a6d3c8e5b01'
    const seen: Array<[number | null, string | null]> = []
    const resolveUnknown = async (endsAt: number | null, listed: string | null): Promise<'cancelled'> => { seen.push([endsAt, listed]); return 'cancelled' }
    const lost: Run = async (attempt) => await attempt.send(async () => { throw upstreamError('unknown') }, ENDS, LISTED)
    await t.rejects(idem.handle(input(fakeCancel(), { key: 'with-end', run: lost, resolveUnknown })))
    t.equal((await idem.handle(input(fakeCancel(), { key: 'with-end', resolveUnknown }))).earlier, 'confirmed')
    const unnamed = fakeCancel({ cancel: [async () => { throw upstreamError('unknown') }] })
    await t.rejects(idem.handle(input(unnamed, { key: 'without-end', resolveUnknown })))
    t.equal((await idem.handle(input(unnamed, { key: 'without-end', resolveUnknown }))).earlier, 'confirmed')
    t.same(seen, [[ENDS, LISTED], [null, null]], 'what the first attempt named; then none (an ended appointment is never presumed)')
  })

  t.test(`${name}: lost answer, retry, upstream still lists it: sent exactly once more`, async (t) => {
    const idem = await make(t)
    const cancel = fakeCancel({ cancel: [async () => { throw upstreamError('unknown', 502, ErrorCode.UPSTREAM_ERROR) }, async () => CANCELLED] })
    const resolveUnknown = async (): Promise<'send'> => 'send'
    await t.rejects(idem.handle(input(cancel, { resolveUnknown })))
    const retry = await idem.handle(input(cancel, { resolveUnknown }))
    t.same(retry, { answer: CANCELLED, earlier: null })
    t.equal((await idem.handle(input(cancel, { resolveUnknown }))).earlier, 'replayed')
    t.equal(cancel.sends(), 2)
  })

  t.test(`${name}: a cancel resent for an unknown outcome and refused: confirmed when a fresh look finds it cancelled, else the refusal stands`, async (t) => {
    const idem = await make(t)
    const rejected = (): UpstreamErrorLike => upstreamError('answered', 400, ErrorCode.UPSTREAM_REJECTED)
    // The earlier cancel was still being applied when the first look listed it: the resend is
    // refused, and the next look finds it gone.
    const raced = fakeCancel({ cancel: [async () => { throw upstreamError('unknown') }, async () => { throw rejected() }] })
    const looks: Array<'send' | 'cancelled'> = ['send', 'cancelled']
    await t.rejects(idem.handle(input(raced, { key: 'raced' })))
    const confirmed = await idem.handle(input(raced, { key: 'raced', resolveUnknown: async () => looks.shift() as 'send' | 'cancelled' }))
    t.match(confirmed, { answer: { statusCode: 200, body: { message: /confirmed/ } }, earlier: 'confirmed' })
    t.equal((await idem.handle(input(raced, { key: 'raced' }))).earlier, 'replayed')
    t.equal(raced.sends(), 2)
    // Also for the upstream's NotFoundError (the contract's 404).
    const gone = fakeCancel({ cancel: [async () => { throw upstreamError('unknown') }, async () => { throw upstreamError('answered', 404, ErrorCode.APPOINTMENT_NOT_FOUND) }] })
    const goneLooks: Array<'send' | 'cancelled'> = ['send', 'cancelled']
    await t.rejects(idem.handle(input(gone, { key: 'gone' })))
    t.equal((await idem.handle(input(gone, { key: 'gone', resolveUnknown: async () => goneLooks.shift() as 'send' | 'cancelled' }))).earlier, 'confirmed')

    // Still listed after the refusal: a refusal of its own, stored and replayed.
    const refused = fakeCancel({ cancel: [async () => { throw upstreamError('unknown') }, async () => { throw rejected() }] })
    let listedLooks = 0
    await t.rejects(idem.handle(input(refused, { key: 'refused' })))
    t.equal((await rejection(idem.handle(input(refused, { key: 'refused', resolveUnknown: async () => { listedLooks += 1; return 'send' } })))).code, ErrorCode.UPSTREAM_REJECTED)
    t.equal(listedLooks, 2, 'looked once more after the refusal')
    t.match(await idem.handle(input(refused, { key: 'refused' })), { answer: { statusCode: 400, body: { code: ErrorCode.UPSTREAM_REJECTED } }, earlier: 'replayed' })
    t.equal(refused.sends(), 2)

    // The second look fails: nothing shows it cancelled, the refusal stands.
    const unseen = fakeCancel({ cancel: [async () => { throw upstreamError('unknown') }, async () => { throw rejected() }] })
    let unseenLooks = 0
    await t.rejects(idem.handle(input(unseen, { key: 'unseen' })))
    const lookFails = async (): Promise<'send'> => { if (++unseenLooks > 1) throw upstreamError('not-sent', 502, ErrorCode.UPSTREAM_UNAVAILABLE); return 'send' }
    t.equal((await rejection(idem.handle(input(unseen, { key: 'unseen', resolveUnknown: lookFails })))).code, ErrorCode.UPSTREAM_REJECTED)

    // Any other failure of the resend (a 502, another unknown outcome) is not looked at again.
    const failing = fakeCancel({ cancel: [async () => { throw upstreamError('unknown') }, async () => { throw upstreamError('answered', 502, ErrorCode.UPSTREAM_ERROR) }] })
    let failingLooks = 0
    await t.rejects(idem.handle(input(failing, { key: 'failing' })))
    t.equal((await rejection(idem.handle(input(failing, { key: 'failing', resolveUnknown: async () => { failingLooks += 1; return 'send' } })))).code, ErrorCode.UPSTREAM_ERROR)
    t.equal(failingLooks, 1)

    // A refusal on a first attempt (no unknown outcome before it) is the answer, looked at by nobody.
    const plain = fakeCancel({ cancel: [async () => { throw rejected() }] })
    t.equal((await rejection(idem.handle(input(plain, { key: 'plain' })))).code, ErrorCode.UPSTREAM_REJECTED)
  })

  t.test(`${name}: concurrent retries of an unknown outcome: one resolves, the other gets 409`, async (t) => {
    const idem = await make(t)
    const cancel = fakeCancel({ cancel: [async () => { throw upstreamError('unknown') }, async () => CANCELLED] })
    await t.rejects(idem.handle(input(cancel)))
    const lookup = deferred<'send'>()
    const resolveUnknown = async (): Promise<'send'> => await lookup.promise
    const a = idem.handle(input(cancel, { resolveUnknown }))
    await sleep(20)
    t.equal((await rejection(idem.handle(input(cancel, { resolveUnknown })))).statusCode, 409)
    lookup.resolve('send')
    t.equal((await a).answer.statusCode, 200)
    t.equal(cancel.sends(), 2)
  })

  t.test(`${name}: a failed resolution leaves the outcome unknown for the next retry`, async (t) => {
    const idem = await make(t)
    const cancel = fakeCancel({ cancel: [async () => { throw upstreamError('unknown') }] })
    await t.rejects(idem.handle(input(cancel)))
    const fetchFailed = upstreamError('answered', 502, ErrorCode.UPSTREAM_ERROR)
    await t.rejects(idem.handle(input(cancel, { resolveUnknown: async () => { throw fetchFailed } })), fetchFailed)
    const retry = await idem.handle(input(cancel, { resolveUnknown: async () => 'cancelled' }))
    t.equal(retry.answer.statusCode, 200)
    t.equal(cancel.sends(), 1)
  })

  t.test(`${name}: our bug after the cancel was handed over counts as an unknown outcome`, async (t) => {
    const idem = await make(t)
    let resolves = 0
    const cancel = fakeCancel({ cancel: [async () => { throw new TypeError('mapping bug') }] })
    await t.rejects(idem.handle(input(cancel)), TypeError)
    await idem.handle(input(cancel, { resolveUnknown: async () => { resolves += 1; return 'cancelled' } }))
    t.equal(resolves, 1)
    t.equal(cancel.sends(), 1)
  })

  t.test(`${name}: a replica dies mid-request: its marker expires and a later request resolves the outcome`, async (t) => {
    const idem = await make(t, 300)
    const handedOver = deferred<void>()
    const never = fakeCancel({ cancel: [async () => { handedOver.resolve(); return await new Promise(() => {}) }] })
    idem.handle(input(never)).catch(() => {})
    await handedOver.promise
    t.equal(never.sends(), 1, 'the dead request had handed its cancel over')
    t.equal((await rejection(idem.handle(input(never)))).statusCode, 409)
    // Counted from after its begin: its marker has certainly expired.
    await sleep(350)
    const later = fakeCancel()
    let resolves = 0
    const answer = await idem.handle(input(later, { resolveUnknown: async () => { resolves += 1; return 'send' } }))
    t.same(answer, { answer: CANCELLED, earlier: null })
    t.equal(resolves, 1, 'the outcome was looked up first')
    t.equal(later.sends(), 1)
  })

  t.test(`${name}: a retry resolving a lost answer dies too: the next one resolves again, never sends blind`, async (t) => {
    const idem = await make(t, 300)
    const cancel = fakeCancel({ cancel: [async () => { throw upstreamError('unknown') }, async () => CANCELLED] })
    await t.rejects(idem.handle(input(cancel)), { code: ErrorCode.UPSTREAM_TIMEOUT })
    // The resolving retry's lookup never returns (its replica died).
    const looking = deferred<void>()
    idem.handle(input(cancel, { resolveUnknown: async () => { looking.resolve(); return await new Promise<never>(() => {}) } })).catch(() => {})
    await looking.promise
    await sleep(350)
    let resolves = 0
    const answer = await idem.handle(input(cancel, { resolveUnknown: async () => { resolves += 1; return 'cancelled' } }))
    t.match(answer.answer.body, { message: /confirmed/ })
    t.equal(resolves, 1)
    t.equal(cancel.sends(), 1, 'the first cancel took effect: never sent again')
  })

  t.test(`${name}: a replica dies before its cancel: a later request starts afresh, with no lookup to guess from`, async (t) => {
    const idem = await make(t, 300)
    // The ownership check never returns: the cancel was never handed over.
    const checking = deferred<void>()
    const stuck = fakeCancel({ before: async () => { checking.resolve(); await new Promise(() => {}) } })
    idem.handle(input(stuck)).catch(() => {})
    await checking.promise
    t.equal((await rejection(idem.handle(input(stuck)))).statusCode, 409, 'held while the marker lives')
    await sleep(350)
    // resolveUnknown throws (input's default): an absent appointment must not read as "cancelled".
    const later = fakeCancel({ before: async () => { throw notFound() } })
    await t.rejects(idem.handle(input(later)), { statusCode: 404, code: ErrorCode.APPOINTMENT_NOT_FOUND })
    t.equal(stuck.sends() + later.sends(), 0)
  })

  // The in-flight markers below live 300 ms, not 50: a request that must finish within its
  // marker's life (the retry, the takeover, the first cancel) must not lose it to a loaded
  // machine's event-loop stall of a few tens of milliseconds.
  t.test(`${name}: an owner whose marker expired before the cancel does not send it`, async (t) => {
    const idem = await make(t, 300)
    const slow = fakeCancel({ before: async () => { await sleep(400) } })
    const error = await rejection(idem.handle(input(slow)))
    t.equal(error.statusCode, 409)
    t.equal(error.code, ErrorCode.IDEMPOTENCY_IN_FLIGHT)
    t.match(error.message, /not sent/)
    t.same(error.headers, { 'Retry-After': '1' })
    t.equal(slow.sends(), 0)
    // Nothing was sent, so the retry starts afresh (resolveUnknown would throw).
    const retry = fakeCancel()
    t.same(await idem.handle(input(retry)), { answer: CANCELLED, earlier: null })
    t.equal(retry.sends(), 1)
  })

  t.test(`${name}: a retry that took over from an owner whose marker expired: the owner does not send`, async (t) => {
    const idem = await make(t, 300)
    const gate = deferred<void>()
    const reached = deferred<void>()
    const slow = fakeCancel({ before: async () => { reached.resolve(); await gate.promise } })
    const first = rejection(idem.handle(input(slow)))
    await reached.promise
    await sleep(350)
    const takeover = idem.handle(input(fakeCancel()))
    gate.resolve()
    t.equal((await first).statusCode, 409)
    t.same(await takeover, { answer: CANCELLED, earlier: null })
    t.equal(slow.sends(), 0)
  })

  t.test(`${name}: completed records expire after the replay TTL`, async (t) => {
    const idem = createIdempotency({ store: await makeStore(t), inFlightTtlMs: 300, replayTtlMs: 400 })
    const cancel = fakeCancel()
    await idem.handle(input(cancel, { key: 'expiring' }))
    t.equal((await idem.handle(input(cancel, { key: 'expiring' }))).earlier, 'replayed')
    await sleep(450)
    t.equal((await idem.handle(input(cancel, { key: 'expiring', reason: 'other' }))).earlier, null, 'the key is new again')
    t.equal(cancel.runs(), 2)
  })

  t.test(`${name}: a confirmation is kept for the replay TTL, past the in-flight marker's`, async (t) => {
    const idem = createIdempotency({ store: await makeStore(t), inFlightTtlMs: 300, replayTtlMs: 5000 })
    // Confirmed at once (the look finds it cancelled), and after a refused resend (the second look does).
    const lost = fakeCancel({ cancel: [async () => { throw upstreamError('unknown') }] })
    const raced = fakeCancel({ cancel: [async () => { throw upstreamError('unknown') }, async () => { throw upstreamError('answered', 400, ErrorCode.UPSTREAM_REJECTED) }] })
    const looks: Array<'send' | 'cancelled'> = ['send', 'cancelled']
    await t.rejects(idem.handle(input(lost, { key: 'confirmed-at-once' })))
    await t.rejects(idem.handle(input(raced, { key: 'confirmed-after-resend' })))
    t.equal((await idem.handle(input(lost, { key: 'confirmed-at-once', resolveUnknown: async () => 'cancelled' }))).earlier, 'confirmed')
    t.equal((await idem.handle(input(raced, { key: 'confirmed-after-resend', resolveUnknown: async () => looks.shift() as 'send' | 'cancelled' }))).earlier, 'confirmed')
    await sleep(450)
    for (const [key, cancel] of [['confirmed-at-once', lost], ['confirmed-after-resend', raced]] as const) {
      const later = await idem.handle(input(cancel, { key }))
      t.equal(later.earlier, 'replayed', `${key}: still the stored answer`)
      t.equal(later.answer.statusCode, 200, key)
    }
    t.equal(lost.sends(), 1)
    t.equal(raced.sends(), 2)
  })
}

t.test('redis: concurrent same-key requests through two instances with their own clients: one upstream cancel', async (t) => {
  await redisServer.flush()
  const a = createIdempotency({ store: createRedisIdempotencyStore({ redis: await redisClient(t) }), inFlightTtlMs: 5000 })
  const b = createIdempotency({ store: createRedisIdempotencyStore({ redis: await redisClient(t) }), inFlightTtlMs: 5000 })
  const cancel = fakeCancel({ delayMs: 30 })
  const results = await Promise.allSettled(Array.from({ length: 10 }, (_, i) => (i % 2 === 0 ? a : b).handle(input(cancel, { key: 'shared-key' }))))
  t.equal(cancel.sends(), 1)
  const fulfilled = results.filter((result) => result.status === 'fulfilled')
  const rejected = results.filter((result) => result.status === 'rejected')
  t.equal(fulfilled.length, 1)
  t.ok(rejected.every((result) => (result.reason as ApiError).code === ErrorCode.IDEMPOTENCY_IN_FLIGHT))
  t.equal((await b.handle(input(cancel, { key: 'shared-key' }))).earlier, 'replayed')
  t.equal(cancel.sends(), 1)
})

t.test('redis: nothing stored carries the reason, the email or the raw key', async (t) => {
  await redisServer.flush()
  const client = await redisClient(t)
  const idem = createIdempotency({ store: createRedisIdempotencyStore({ redis: client }), inFlightTtlMs: 5000 })
  const key = `key-with-${EMAIL}`
  await idem.handle(input(fakeCancel(), { key }))
  await idem.handle(input(fakeCancel({ cancel: [async () => { throw upstreamError('unknown') }] }), { key: 'unknown-key' })).catch(() => {})
  await idem.handle(input(fakeCancel({ delayMs: 10 }), { key: undefined, appointmentId: OTHER_APPOINTMENT }))
  const keys = await client.keys('*')
  t.ok(keys.length >= 2)
  for (const redisKey of keys) {
    const dump = redisKey + JSON.stringify(await client.hgetall(redisKey))
    for (const secret of [REASON, EMAIL, key, SCOPE, 'Feeling', 'example.com']) t.notOk(dump.includes(secret), `no ${secret} in ${redisKey}`)
  }
})

t.test('the store fails: a keyed cancel gets 503 with Retry-After, never runs; writes after the cancel never fail it', async (t) => {
  const broken: IdempotencyStore = {
    begin: async () => { throw new Error('redis down') },
    complete: async () => { throw new Error('redis down') },
    markSending: async () => { throw new Error('redis down') },
    markUnknown: async () => { throw new Error('redis down') },
    release: async () => { throw new Error('redis down') }
  }
  const warnings: string[] = []
  const idem = createIdempotency({ store: broken, inFlightTtlMs: 5000, log: { warn: (_object, message) => warnings.push(message) } })
  const cancel = fakeCancel()
  const error = await rejection(idem.handle(input(cancel)))
  t.equal(error.statusCode, 503)
  t.equal(error.code, ErrorCode.SERVICE_UNAVAILABLE)
  t.same(error.headers, { 'Retry-After': '2' })
  t.equal(cancel.runs(), 0)

  const memory = createMemoryIdempotencyStore()
  const unmarked = createIdempotency({ store: { ...broken, begin: memory.begin }, inFlightTtlMs: 5000 })
  const refused = await rejection(unmarked.handle(input(cancel, { key: 'k-unmarked' })))
  t.equal(refused.statusCode, 503, 'the store cannot record that the cancel goes: it does not go')
  t.same(refused.headers, { 'Retry-After': '2' })
  t.equal(cancel.sends(), 0)

  const flaky: IdempotencyStore = { ...broken, begin: memory.begin, markSending: memory.markSending }
  const writes = createIdempotency({ store: flaky, inFlightTtlMs: 5000 })
  const requestWarnings: string[] = []
  const log = { warn: (_object: object, message: string) => requestWarnings.push(message) }
  t.same(await writes.handle(input(cancel, { log })), { answer: CANCELLED, earlier: null })
  const lost = fakeCancel({ cancel: [async () => { throw upstreamError('unknown') }] })
  await t.rejects(writes.handle(input(lost, { key: 'k2', log })), { code: ErrorCode.UPSTREAM_TIMEOUT })
  t.same(requestWarnings, ['idempotency store write failed'], 'two writes failed (the answer, the unknown outcome): told once (the minute\'s line)')
  t.same(warnings, [], 'a keyed cancel refused for the store: its 503 is logged where it is answered (plugins/answers.ts), once')
})

t.test('parseIdempotencyKey: 1 to 255 visible ASCII characters', async (t) => {
  t.equal(parseIdempotencyKey(undefined), undefined)
  for (const good of ['a', '"8e03978e-40d5-43e8-bc93-6894a57f9324"', '!~', 'x'.repeat(255)]) t.equal(parseIdempotencyKey(good), good)
  for (const bad of ['', ' ', 'has space', 'x'.repeat(256), 'tab\there', 'é', 'a, b', ['a', 'b']]) {
    t.throws(() => parseIdempotencyKey(bad), { statusCode: 400, code: ErrorCode.VALIDATION_FAILED }, JSON.stringify(bad))
  }
})

t.test('requestFingerprint: an absent reason differs from every present one', async (t) => {
  const absent = requestFingerprint(SCOPE, APPOINTMENT, undefined)
  t.match(absent, /^[0-9a-f]{64}$/)
  t.not(absent, requestFingerprint(SCOPE, APPOINTMENT, ''))
  t.not(absent, requestFingerprint(SCOPE, APPOINTMENT, 'absent'))
  t.not(requestFingerprint(SCOPE, APPOINTMENT, 'a'), requestFingerprint(SCOPE, APPOINTMENT, 'b'))
  t.not(requestFingerprint(SCOPE, APPOINTMENT, 'a'), requestFingerprint(SCOPE, OTHER_APPOINTMENT, 'a'))
  t.equal(requestFingerprint(SCOPE, APPOINTMENT, 'a'), requestFingerprint(SCOPE, APPOINTMENT.toUpperCase(), 'a'))
  t.not(requestFingerprint(SCOPE, APPOINTMENT, 'a'), requestFingerprint(scopeOf('other@example.com'), APPOINTMENT, 'a'), 'bound to the patient')
})

t.test('defaults', async (t) => {
  t.equal(REPLAY_TTL_MS, 86_400_000)
  t.equal(inFlightTtlFor(5000), 17_000)
})

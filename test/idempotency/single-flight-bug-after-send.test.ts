import t from 'tap'
import { createMemoryIdempotencyStore } from '../../src/idempotency/index.js'
import { createSingleFlight } from '../../src/idempotency/single-flight.js'
import { CANCELLED, EMAIL, fakeCancel, scopeOf } from './fakes.js'

// Kills the mutant that drops `|| settlement.answer === null` (src/idempotency/single-flight.ts, lead):
// a leader whose own bug came after the cancel was handed over has no answer to leave, so its
// marker must be released at once (not completed with a null answer, which throws, is swallowed by
// `quietly`, and leaves the marker in flight until inFlightTtlMs: followers get 409 meanwhile).
const SCOPE = scopeOf(EMAIL)
const FP = 'f'.repeat(64)

t.test('across replicas: our bug after the cancel was handed over releases the marker at once', async (t) => {
  const store = createMemoryIdempotencyStore()
  const warnings: string[] = []
  const options = { inFlightTtlMs: 5000, waitMs: 200, pollMs: 10, log: { warn: (_object: object, message: string) => { warnings.push(message) } } }
  const a = createSingleFlight({ store, ...options })
  const b = createSingleFlight({ store, ...options })
  const buggy = fakeCancel({ cancel: [async () => { throw new TypeError('bug') }] })
  await t.rejects(a.runOnce(SCOPE, FP, buggy.run), TypeError)
  t.equal(buggy.sends(), 1, 'the bug came after the cancel was handed over')
  const ok = fakeCancel()
  const began = Date.now()
  t.same(await b.runOnce(SCOPE, FP, ok.run), { answer: CANCELLED, shared: false }, 'the next request leads at once: no 409 behind a marker left in flight')
  t.ok(Date.now() - began < 150, 'without waiting for the marker to expire')
  t.same(warnings, [], 'no failed store write')
})

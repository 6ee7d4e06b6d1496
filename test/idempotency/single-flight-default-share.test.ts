import t from 'tap'
import { createSingleFlight } from '../../src/idempotency/single-flight.js'
import { CANCELLED, EMAIL, fakeCancel, scopeOf } from './fakes.js'

// Kills the mutant `shareTtlMs ?? 500` -> `?? 5000` (src/idempotency/single-flight.ts,
// createSingleFlight): the app builds its single flight without shareTtlMs, so the default is what
// patients get. A double tap just after the answer shares it; a deliberate retry half a second
// later is a new request.
const SCOPE = scopeOf(EMAIL)
const FP = 'f'.repeat(64)

t.test('the default share time: a double tap within 500 ms shares the answer, a retry after it does not', async (t) => {
  let clock = 1_000
  const flight = createSingleFlight({ store: null, inFlightTtlMs: 5000, now: () => clock })
  const cancel = fakeCancel()
  t.same(await flight.runOnce(SCOPE, FP, cancel.run), { answer: CANCELLED, shared: false })
  clock += 499
  t.same(await flight.runOnce(SCOPE, FP, cancel.run), { answer: CANCELLED, shared: true }, 'a double tap: the same answer')
  clock += 1
  t.same(await flight.runOnce(SCOPE, FP, cancel.run), { answer: CANCELLED, shared: false }, 'half a second on: a new request')
  t.equal(cancel.sends(), 2)
})

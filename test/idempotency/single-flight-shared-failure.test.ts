import t from 'tap'
import { createSingleFlight } from '../../src/idempotency/single-flight.js'
import { createMemoryIdempotencyStore } from '../../src/idempotency/store.js'
import { EMAIL, fakeCancel, scopeOf, upstreamError } from './fakes.js'

/**
 * `sharedFailure` says whose error a follower got: it is called for a follower in this process
 * whose leader failed, and for no one else (its caller audits the request 'shared' on it). A
 * follower of a leader that succeeded learns so from its result (`shared: true`), and the leader's
 * own failure is its own.
 */

const SCOPE = scopeOf(EMAIL)
const FP = 'e'.repeat(64)

for (const [name, store] of [['with a store', () => createMemoryIdempotencyStore()], ['without one', () => null]] as const) {
  t.test(`${name}: sharedFailure is called for a follower of a failed leader only`, async (t) => {
    const flight = createSingleFlight({ store: store(), inFlightTtlMs: 5000 })
    const calls = { leader: 0, follower: 0 }

    const succeeding = fakeCancel({ delayMs: 20 })
    const shared = await Promise.all([
      flight.runOnce(SCOPE, FP, succeeding.run, undefined, () => { calls.leader += 1 }),
      flight.runOnce(SCOPE, FP, succeeding.run, undefined, () => { calls.follower += 1 })
    ])
    t.same(shared.map((result) => result.shared), [false, true], 'one sent, the other shared its answer')
    t.same(calls, { leader: 0, follower: 0 }, 'a shared answer is no shared failure')

    const failing = fakeCancel({ delayMs: 20, cancel: [async () => { throw upstreamError('unknown') }] })
    const failed = await Promise.allSettled([
      flight.runOnce(SCOPE, 'd'.repeat(64), failing.run, undefined, () => { calls.leader += 1 }),
      flight.runOnce(SCOPE, 'd'.repeat(64), failing.run, undefined, () => { calls.follower += 1 })
    ])
    t.equal(failing.sends(), 1)
    t.same(failed.map((result) => result.status), ['rejected', 'rejected'])
    t.same(calls, { leader: 0, follower: 1 }, 'the follower shared the failure; the leader\'s is its own')
  })
}

import t from 'tap'
import { createMemoryBudget } from '../../src/limits/org-budget.js'
import type { CooldownStore } from '../../src/limits/cooldown.js'
import { createUpstreamGate, type UpstreamGate } from '../../src/limits/upstream-gate.js'

/**
 * A gate whose cooldown store answers each 429 with the next of `trips` and records what is written
 * back in `extended`; `clock.now` drives the gate's own clock.
 */
function gateWithTrips (trips: Array<{ remainingMs: number, fresh: boolean }>): { gate: UpstreamGate, extended: number[], clock: { now: number } } {
  const clock = { now: 0 }
  const extended: number[] = []
  const cooldown: CooldownStore = {
    remaining: () => 0,
    check: { key: null, memory: () => 0 },
    trip: () => trips.shift() as { remainingMs: number, fresh: boolean },
    extend: (remainingMs) => { extended.push(remainingMs); return remainingMs }
  }
  const gate = createUpstreamGate({ budget: createMemoryBudget({ count: 100, windowMs: 60_000, now: () => clock.now }), cooldown, now: () => clock.now })
  return { gate, extended, clock }
}

// Kills the mutant LOST_COOLDOWN_SLACK_MS 250 -> 0 (src/limits/upstream-gate.ts): a store whose
// answer is a little less than what this process remembers (the round trip between the two
// readings) has not lost the cooldown: nothing is written back, and its answer is the one used.
t.test('a store answer within the slack of the remembered cooldown is not a lost cooldown', async (t) => {
  const { gate, extended, clock } = gateWithTrips([{ remainingMs: 30_000, fresh: true }, { remainingMs: 28_900, fresh: false }, { remainingMs: 20_000, fresh: false }])
  t.equal(await gate.onRateLimited(30_000), 30_000)
  clock.now = 1000
  t.equal(await gate.onRateLimited(null), 28_900, '100 ms less than remembered: within the slack, the store\'s answer')
  t.same(extended, [], 'and nothing written back')
  clock.now = 2000
  t.equal(await gate.onRateLimited(null), 28_000, '8 s less: lost by the store, the remembered cooldown is written back')
  t.same(extended, [28_000])
})

// Kills LOST_COOLDOWN_SLACK_MS 250 -> 2500 (src/limits/upstream-gate.ts): one second less than
// remembered is no round trip, it is a store that lost part of the cooldown: written back.
t.test('a store answer a second short of the remembered cooldown is written back', async (t) => {
  const { gate, extended, clock } = gateWithTrips([{ remainingMs: 30_000, fresh: true }, { remainingMs: 28_000, fresh: false }])
  t.equal(await gate.onRateLimited(30_000), 30_000)
  clock.now = 1000
  t.equal(await gate.onRateLimited(null), 29_000, '1 s less than remembered: the remembered cooldown')
  t.same(extended, [29_000], 'written back')
})

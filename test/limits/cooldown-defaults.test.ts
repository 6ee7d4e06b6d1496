import t from 'tap'
import { createMemoryCooldown } from '../../src/limits/cooldown.js'

// Kills the mutant maxMs default 60_000 -> 120_000 (src/limits/cooldown.ts, backoffOf): README
// fixes the backoff without Retry-After at 1 s x 2^n, up to 60 s (jitter 0.5 is the factor 1.0).
t.test('the default backoff doubles from a second and stops at 60 s', async (t) => {
  let now = 0
  const cooldown = createMemoryCooldown({ now: () => now })
  const seen: number[] = []
  for (let episode = 0; episode < 8; episode++) {
    const trip = cooldown.trip(null, 0.5)
    t.equal(trip.fresh, true)
    seen.push(trip.remainingMs)
    now += trip.remainingMs // the next 429 comes as this cooldown ends: the same streak
  }
  t.same(seen, [1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000])
})

// Kills the mutant that drops `remainingMs > 0 &&` (src/limits/cooldown.ts, the memory cooldown's
// extend): writing back nothing (no cooldown runs here) changes nothing, not even the streak of the
// next backoff.
t.test('extend(0) after a quiet period is not an episode: the next backoff starts over', async (t) => {
  let now = 0
  const cooldown = createMemoryCooldown({ now: () => now, minMs: 10, baseMs: 40, maxMs: 200, resetAfterMs: 400 })
  t.equal(cooldown.trip(null, 0.5).remainingMs, 40)
  now = 1000 // quiet far past the reset period
  t.equal(cooldown.extend(0), 0, 'nothing to write back')
  now = 1001
  t.equal(cooldown.trip(null, 0.5).remainingMs, 40, 'the first of a new streak, not the second')
})

// Kills `at - until >= backoff.resetAfterMs` -> `>` in the memory trip (src/limits/cooldown.ts, the memory store's trip):
// a quiet period of exactly resetAfterMs after the end starts the doubling over.
t.test('a quiet period of exactly resetAfterMs after a cooldown starts the doubling over; a millisecond less does not', async (t) => {
  const options = { minMs: 10, baseMs: 40, maxMs: 200, resetAfterMs: 400 }
  for (const [quiet, expected] of [[399, 80], [400, 40]] as const) {
    let now = 0
    const cooldown = createMemoryCooldown({ now: () => now, ...options })
    t.equal(cooldown.trip(null, 0.5).remainingMs, 40)
    now = 40 + quiet
    t.equal(cooldown.trip(null, 0.5).remainingMs, expected, `quiet for ${quiet} ms after the end`)
  }
})

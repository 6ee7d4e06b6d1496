import t from 'tap'
import { startRedis } from '../helpers/redis.js'
import { createMemoryBudget, createRedisBudget } from '../../src/limits/org-budget.js'
import { strictFallbackOn, uniqueName } from './fixtures/support.js'

// Kills RECOVER_WINDOWS 10 -> 5 (src/limits/org-budget.ts): README says a 429 halves the budget,
// which then recovers linearly over about five windows (from half; from nothing in ten).
t.test('the default recovery: from half to full in five windows', async (t) => {
  let now = 0
  const budget = createMemoryBudget({ count: 10, windowMs: 1000, now: () => now })
  budget.decrease()
  t.equal(budget.remaining(), 5, 'halved')
  now = 2500
  t.equal(budget.remaining(), 7, 'two and a half windows on: half of the way back')
  now = 5000
  t.equal(budget.remaining(), 10, 'five windows on: all of it')
})

// Kills the guard's cap 1000 -> 2000 (src/limits/org-budget.ts, spanOf): the guard is 1% of the
// window, at most 1 s; with a 5 min window that is 1 s, seen in the wait until the next admission.
t.test('the default guard: 1% of the window, at most a second', async (t) => {
  const now = 0
  const short = createMemoryBudget({ count: 1, windowMs: 60_000, now: () => now })
  short.take()
  t.same(short.take(), { ok: false, retryAfterMs: 60_000 + 600 + 1 }, '60 s: 600 ms')
  const long = createMemoryBudget({ count: 1, windowMs: 300_000, now: () => now })
  long.take()
  t.same(long.take(), { ok: false, retryAfterMs: 300_000 + 1000 + 1 }, '5 min: capped at 1 s, not 3 s')
})

// Kills `'(' .. int(now - window)` -> `int(now - window)` in takeScript (src/limits/org-budget.ts):
// the log counts the closed interval [now - span, now]. A call this replica made alone, entered
// into Redis's log aged exactly one span, still counts.
t.test('redis: a call exactly one span old still counts (closed interval)', async (t) => {
  const redis = await startRedis(t)
  const strict = await strictFallbackOn(t, redis.url)
  // Long back on Redis: no twin check, so Redis's log alone decides.
  const fallback = { ...strict, redisFor: () => Number.POSITIVE_INFINITY }
  let now = 0
  const options = { count: 1, windowMs: 1000, guardMs: 0 }
  const memory = createMemoryBudget({ ...options, trackAlone: true, now: () => now })
  const budget = createRedisBudget({ ...options, fallback, memory, tag: uniqueName('closed') })
  t.match(memory.take(), { ok: true }, 'a call admitted alone, at 0 on the twin\'s clock')
  now = 1000
  t.match(await budget.take(), { ok: false }, 'entered at exactly one span old: the count is reached')
})

// Kills `if floor and used < count` -> `if floor` in takeScript (src/limits/org-budget.ts): a
// log already at the full count (calls admitted before a decrease) waits for its oldest entry to
// leave; the limit's recovery cannot admit more than the count, so it is no earlier admission.
t.test('after a decrease, a log at the full count waits for its oldest entry, not the recovery', async (t) => {
  const redis = await startRedis(t)
  const options = { count: 2, windowMs: 10_000, guardMs: 0, recoverMs: 1000 }
  const budgets = {
    memory: createMemoryBudget(options),
    // Long back on Redis: no twin check, so Redis's script alone decides.
    redis: createRedisBudget({ ...options, fallback: { ...await strictFallbackOn(t, redis.url), redisFor: () => Number.POSITIVE_INFINITY }, memory: createMemoryBudget(options), tag: uniqueName('full') })
  }
  for (const [kind, budget] of Object.entries(budgets)) {
    t.match(await budget.take(), { ok: true })
    t.match(await budget.take(), { ok: true })
    await budget.decrease()
    const refused = await budget.take() as { ok: false, retryAfterMs: number }
    t.equal(refused.ok, false, `${kind}: refused`)
    t.ok(refused.retryAfterMs > 9000, `${kind}: until the oldest entry leaves (${refused.retryAfterMs} ms), not the 1 s of the recovery`)
  }
})

import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { startRedis } from '../helpers/redis.js'
import { createMemoryBudget, createRedisBudget } from '../../src/limits/org-budget.js'
import type { StoreFallback } from '../../src/limits/fallback.js'
import { strictFallbackOn, uniqueName } from './fixtures/support.js'

/**
 * A decrease settles once Redis holds it, not as soon as it is asked for: the other replicas read
 * the halved limit from Redis, and the caller (the upstream gate, after a 429) answers only then.
 * A Redis that answers slowly shows the difference.
 */

const redis = await startRedis(t)

t.test('redis: decrease() resolves after Redis\'s decrease is done', async (t) => {
  const options = { count: 10, windowMs: 60_000 }
  const real = await strictFallbackOn(t, redis.url)
  let settled = 0
  const slow: StoreFallback = {
    redisConfigured: true,
    redisFor: () => real.redisFor(),
    async run (viaRedis, inMemory, whilePaused) {
      await sleep(50)
      const result = await real.run(viaRedis, inMemory, whilePaused)
      settled += 1
      return result
    }
  }
  const budget = createRedisBudget({ ...options, fallback: slow, tag: uniqueName('settles'), memory: createMemoryBudget(options) })
  await budget.decrease()
  t.equal(settled, 1, 'Redis\'s decrease was done when it resolved')
  t.equal(await budget.remaining(), 5, 'and Redis\'s limit is halved')
})

import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { pino } from 'pino'
import { startRedis } from '../helpers/redis.js'
import { createSharedState } from '../../src/state/redis.js'

/**
 * README: the Redis client speaks RESP2 (ioredis 6 says HELLO 3 unless told `protocol: 2`), as
 * every Redis-compatible server or proxy does. Pinned on the server's own view of the connection
 * (CLIENT INFO's `resp=`, Redis 7), found by a mutation review: `protocol: 3` passed every test.
 */
t.test('the shared state\'s connection speaks RESP2', async (t) => {
  const redis = await startRedis(t)
  const state = createSharedState({ url: redis.url, log: pino({ level: 'silent' }), commandTimeoutMs: 1000 })
  t.teardown(() => state.close())
  const readyBy = Date.now() + 5000
  while (state.mode() !== 'redis' && Date.now() < readyBy) await sleep(10)
  t.equal(state.mode(), 'redis')
  const info = String(await state.redis!.call('CLIENT', 'INFO'))
  t.match(info, / resp=2( |$)/m, 'RESP2, not RESP3')
})

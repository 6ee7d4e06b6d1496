import t from 'tap'
import { startRedis, redisClient } from '../helpers/redis.js'
import { FAILED_COMMAND_PAUSE_MS } from '../../src/state/redis.js'
import { createReplayGuard } from '../../src/web/replay-guard.js'
import { createLogoutMarks } from '../../src/auth/logout-marks.js'

/**
 * Every command of the replay guards (logout token ids, retired ID tokens) and of the logout marks
 * that fails answers 503 and makes the shared state degraded for FAILED_COMMAND_PAUSE_MS, as a
 * failed session command does: the scripts (claim, markUsed, mark) as much as the plain reads.
 * test/fault/redis-refusals.test.ts shows the reads through the sign-in; here each operation.
 */
const server = await startRedis(t)
const UNAVAILABLE = { statusCode: 503, code: 'SERVICE_UNAVAILABLE' }

t.test('each operation on a failing connection: 503, and the state degraded for the pause', async (t) => {
  const redis = redisClient(server.url)
  t.teardown(() => { redis.disconnect() })
  t.equal(await redis.ping(), 'PONG')
  const pauses: number[] = []
  const state = { redis, degradeFor: (ms: number) => { pauses.push(ms) } }
  const guard = createReplayGuard(state)
  const marks = createLogoutMarks(state)
  // Working first: nothing degraded.
  t.equal(await guard.claim('id-1', 60_000), true)
  await guard.markUsed('id-1')
  t.equal(await guard.used('id-1'), true)
  await marks.mark('mark-1', 1_700_000_000, 60_000)
  t.equal(await marks.markedAt('mark-1'), 1_700_000_000)
  t.same(pauses, [])

  redis.disconnect()
  const operations: Array<[string, () => Promise<unknown>]> = [
    ['claim', async () => await guard.claim('id-2', 60_000)],
    ['markUsed', async () => { await guard.markUsed('id-1') }],
    ['used', async () => await guard.used('id-1')],
    ['mark', async () => { await marks.mark('mark-2', 1_700_000_000, 60_000) }],
    ['markedAt', async () => await marks.markedAt('mark-1')]
  ]
  for (const [name, operation] of operations) {
    pauses.length = 0
    await t.rejects(operation(), UNAVAILABLE, `${name}: 503`)
    t.same(pauses, [FAILED_COMMAND_PAUSE_MS], `${name}: the state degraded for the pause`)
  }
})

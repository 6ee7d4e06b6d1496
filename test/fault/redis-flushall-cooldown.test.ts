import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { startRedis } from '../helpers/redis.js'
import { buildTestApp } from '../helpers/app.js'
import { ApiError } from '../../src/errors.js'
import type { UpstreamGate } from '../../src/limits/upstream-gate.js'

/**
 * FLUSHALL mid-run (Redis loses its data without a break of the connection). Reproduced: replica A
 * hears a 429 with Retry-After 60 (the shared cooldown, honoured by every replica); Redis is
 * flushed; A goes on refusing its own calls locally, but nothing ever writes the cooldown back
 * (restoreCooldown runs only after a break), so replica B keeps calling Care360 inside the
 * cooldown for as long as it lasts, until B itself is answered 429. README's "Known limits" admits
 * only the org budget's log for a FLUSHALL. Wanted: the cooldown a replica honours is back in
 * Redis soon after A next refuses a call (here within 1.5 s), so that B is refused too.
 */

async function refusal (gate: UpstreamGate): Promise<ApiError | null> {
  return await Promise.resolve().then(() => gate.acquire('list')).then(() => null, (error: unknown) => {
    if (error instanceof ApiError) return error
    throw error
  })
}

t.test('FLUSHALL during an upstream cooldown: the other replica is still refused', async (t) => {
  const redis = await startRedis(t)
  const a = (await buildTestApp(t, { redis })).app
  const b = (await buildTestApp(t, { redis })).app
  t.equal(await a.upstreamGate.onRateLimited(60_000), 60_000, 'replica A hears a 429 with Retry-After 60')
  await redis.flush()
  // A keeps refusing its own traffic (locally, from what it honours).
  const end = Date.now() + 1500
  let bRefused: ApiError | null = null
  while (Date.now() < end) {
    t.equal((await refusal(a.upstreamGate))?.code, 'UPSTREAM_RATE_LIMITED')
    await sleep(100)
  }
  bRefused = await refusal(b.upstreamGate)
  t.equal(bRefused?.code, 'UPSTREAM_RATE_LIMITED', 'B, which never saw the 429, is refused: the cooldown was written back')
  t.equal(a.sharedState.mode(), 'redis')
})

import t, { type Test } from 'tap'
import { redisClient, startRedis } from '../helpers/redis.js'
import { createMemoryIdempotencyStore, createRedisIdempotencyStore, type IdempotencyStore } from '../../src/idempotency/store.js'
import { requestFingerprint } from '../../src/idempotency/index.js'

/**
 * The appointment's end and its listed id are kept with a key's record each on its own: an
 * appointment listed without a readable end still has its id kept (a confirmation is audited
 * under it), and one whose id is not known still has its end.
 */

const FP = requestFingerprint('scope', '6f1c1d5e-4a47-4f0e-9a55-1d0b1c7e9a11', 'sick')
const LONG = { ttlMs: 60_000, inFlightTtlMs: 30_000 }
const ENDS = 1_900_000_000_123
const LISTED = '3f0b5d2e-8a41-4c1e-9f27-1a6d3c8e5b01'

const redisServer = await startRedis(t)

async function redisStore (t: Test): Promise<IdempotencyStore> {
  const client = redisClient(redisServer.url, { enableOfflineQueue: false, maxRetriesPerRequest: 0, commandTimeout: 1000 })
  t.teardown(() => { client.disconnect() })
  await client.ping().catch(async () => { await new Promise((resolve) => client.once('ready', resolve)) })
  return createRedisIdempotencyStore({ redis: client })
}

const stores: Array<[string, (t: Test) => Promise<IdempotencyStore>]> = [
  ['memory', async () => createMemoryIdempotencyStore()],
  ['redis', redisStore]
]

for (const [name, make] of stores) {
  t.test(`${name}: the listed id without an end, and the end without a listed id, each reach whoever resolves`, async (t) => {
    const store = await make(t)
    for (const [key, endsAt, appointment] of [[`alone-id-${Date.now()}`, null, LISTED], [`alone-end-${Date.now()}`, ENDS, null]] as const) {
      const begun = await store.begin('scope-a', key, FP, LONG)
      if (begun.kind !== 'started') { t.fail(`expected started, got ${begun.kind}`); continue }
      t.equal(await store.markSending('scope-a', key, begun.token, 10, endsAt, appointment), true)
      t.equal(await store.markUnknown('scope-a', key, begun.token, 60_000), true)
      const resolving = await store.begin('scope-a', key, FP, LONG)
      t.same(resolving.kind === 'unknown-outcome' ? [resolving.endsAt, resolving.appointment] : resolving.kind, [endsAt, appointment], `${key}: as sent`)
    }
  })
}

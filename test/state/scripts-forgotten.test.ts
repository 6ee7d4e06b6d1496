import t, { type Test } from 'tap'
import { startRedis, redisClient } from '../helpers/redis.js'
import { strictFallbackOn, uniqueName } from '../limits/fixtures/support.js'
import { createRedisCounterStore } from '../../src/limits/counter-store.js'
import { createRedisCooldown } from '../../src/limits/cooldown.js'
import { createMemoryBudget, createRedisBudget } from '../../src/limits/org-budget.js'
import { RedisSessionStore } from '../../src/auth/session-store.js'
import { createRedisIdempotencyStore } from '../../src/idempotency/store.js'
import { createLogoutMarks } from '../../src/auth/logout-marks.js'
import { createReplayGuard } from '../../src/web/replay-guard.js'
import { DATA_SINCE_KEY } from '../../src/state/redis.js'
import type { Redis } from 'ioredis'

/**
 * Every script of the service on the shared client (EVALSHA once a connection has run it), after
 * Redis forgot its scripts on a live connection (SCRIPT FLUSH; a restart or a failover to a node
 * that never ran them is the same for the next connection): each still runs (NOSCRIPT is answered
 * by sending the script itself), on Redis, not on a memory twin. And every key the stores wrote
 * has an expiry, but the data's age marker (README: set once, no expiry).
 */

const server = await startRedis(t)

const rate = { count: 5, windowMs: 60_000 }

/** One pass over every store operation that runs a script (or a plain command), on Redis only. */
async function everyOperation (redis: Redis, fallback: Fallback, round: number): Promise<void> {
  const tag = uniqueName('budget')
  const counters = createRedisCounterStore({ fallback })
  const hits = await counters.hitInOrder([{ key: `ip-${round}`, rate }, { key: `other-${round}`, rate }])
  if (hits.length !== 2 || hits[0]!.count !== 1) throw new Error('counter')
  if ((await counters.peek(`ip-${round}`))?.count !== 1) throw new Error('peek')

  const cooldown = createRedisCooldown({ fallback, tag })
  const budget = createRedisBudget({ ...rate, fallback, tag, memory: createMemoryBudget(rate) })
  const taken = await budget.take(cooldown.check)
  if (!taken.ok) throw new Error('budget take')
  await budget.decrease()
  await budget.remaining()
  const tripped = await cooldown.trip(1500, 0.5)
  if (tripped.remainingMs < 1000) throw new Error('trip')
  await cooldown.extend(2000)
  if (await cooldown.remaining() <= 0) throw new Error('cooldown remaining')

  const sessions = new RedisSessionStore(redis, { idleTtlMs: 60_000, absoluteTtlMs: 600_000 })
  const { token } = await sessions.create({ email: 'a@example.com', subject: `sub-${round}`, issuer: 'https://idp.example', method: 'mobile', idpSessionId: `sid-${round}` })
  const found = await sessions.lookup(token, [{ scope: 'session', rate }])
  if (found.session === null || found.hits.length !== 1) throw new Error('lookup')
  const second = await sessions.create({ email: 'a@example.com', subject: `sub-${round}`, issuer: 'https://idp.example', method: 'mobile', idpSessionId: null })
  await sessions.revoke(second.token)

  const idem = createRedisIdempotencyStore({ redis })
  const begun = await idem.begin('scope', `key-${round}`, 'fp', { ttlMs: 86_400_000, inFlightTtlMs: 17_000 })
  if (begun.kind !== 'started') throw new Error('begin')
  if (!await idem.markSending('scope', `key-${round}`, begun.token, 5000, 1_900_000_000_000, 'appt')) throw new Error('markSending')
  if (!await idem.markUnknown('scope', `key-${round}`, begun.token, 86_400_000)) throw new Error('markUnknown')
  const again = await idem.begin('scope', `key-${round}`, 'fp', { ttlMs: 86_400_000, inFlightTtlMs: 17_000 })
  if (again.kind !== 'unknown-outcome') throw new Error('begin again')
  if (!await idem.complete('scope', `key-${round}`, again.token, { statusCode: 200, body: { success: true } }, 86_400_000)) throw new Error('complete')
  const other = await idem.begin('scope', `free-${round}`, 'fp', { ttlMs: 86_400_000, inFlightTtlMs: 17_000 })
  if (other.kind !== 'started' || !await idem.release('scope', `free-${round}`, other.token)) throw new Error('release')

  const marks = createLogoutMarks({ redis })
  await marks.mark(`mark-${round}`, 1_700_000_000, 660_000)
  if (await marks.markedAt(`mark-${round}`) !== 1_700_000_000) throw new Error('mark')

  const guard = createReplayGuard({ redis })
  if (!await guard.claim(`jti-${round}`, 660_000)) throw new Error('claim')
  await guard.markUsed(`jti-${round}`)
  if (!await guard.used(`jti-${round}`)) throw new Error('used')

  // The session last: it is revoked by its subject, which reads the index the create wrote.
  if (await sessions.revokeBySubject('https://idp.example', `sub-${round}`) !== 1) throw new Error('revokeBySubject')
}

type Fallback = Awaited<ReturnType<typeof strictFallbackOn>>

/**
 * The stores' shared client (strictFallbackOn's, which runs each script as its ioredis command: a
 * first run on a connection sends the script, the next ones its SHA) and a client of our own to
 * look at the server with.
 */
async function clients (t: Test): Promise<{ fallback: Awaited<ReturnType<typeof strictFallbackOn>>, redis: Redis, admin: Redis }> {
  const fallback = await strictFallbackOn(t, server.url)
  const admin = redisClient(server.url)
  t.teardown(() => admin.disconnect())
  let redis: Redis | null = null
  await fallback.run(async (client) => { redis = client }, () => {})
  return { fallback, redis: redis as unknown as Redis, admin }
}

async function noscriptErrors (admin: Redis): Promise<number> {
  const info = await admin.info('errorstats')
  return Number(/^errorstat_NOSCRIPT:count=(\d+)/m.exec(info)?.[1] ?? 0)
}

t.test('every script runs again after Redis forgot its scripts on a live connection, and every key has an expiry', async (t) => {
  const { fallback, redis: client, admin } = await clients(t)
  await everyOperation(client, fallback, 1)
  await everyOperation(client, fallback, 2)
  t.equal(await noscriptErrors(admin), 0, 'no NOSCRIPT while Redis holds the scripts')

  await admin.script('FLUSH')
  await t.resolves(everyOperation(client, fallback, 3), 'every operation still runs on Redis')
  t.ok(await noscriptErrors(admin) > 0, 'Redis did answer NOSCRIPT (the scripts were sent again)')
  await t.resolves(everyOperation(client, fallback, 4), 'and keeps running')

  const keys = await admin.keys('*')
  t.ok(keys.length > 20, `the stores wrote their keys (${keys.length})`)
  const withoutExpiry: string[] = []
  for (const key of keys) {
    if (key === DATA_SINCE_KEY) continue
    if (await admin.pttl(key) < 0) withoutExpiry.push(key)
  }
  t.same(withoutExpiry, [], 'every key but the data\'s age marker expires by itself')
})

/**
 * README: "the scripts need Redis 5 or later". So every command the stores send, from the client
 * or from a script, must exist in Redis 5.0 as sent: no option added since (6.0's KEEPTTL on SET,
 * 6.2's GET/EXAT/PXAT on SET and GT/LT on ZADD, 7.0's NX/XX/GT/LT on an expiry) and no command
 * added since. Read from MONITOR, which shows a script's commands too.
 */
const SINCE_REDIS_6: Record<string, (args: string[]) => boolean> = {
  set: (args) => args.slice(3).some((arg) => ['keepttl', 'get', 'exat', 'pxat'].includes(arg.toLowerCase())),
  zadd: (args) => args.slice(2).some((arg) => ['gt', 'lt'].includes(arg.toLowerCase())),
  pexpire: (args) => args.length > 3,
  expire: (args) => args.length > 3,
  zrange: (args) => args.length > 4 && args.slice(4).some((arg) => ['byscore', 'bylex', 'rev', 'limit'].includes(arg.toLowerCase()))
}
const COMMANDS_SINCE_REDIS_6 = new Set(['getex', 'getdel', 'lpos', 'zrangestore', 'zmscore', 'smismember', 'copy', 'expiretime', 'pexpiretime', 'hello', 'lmpop', 'zmpop', 'hexpire', 'hpexpire'])

t.test('every command the stores send exists in Redis 5, as the README says they need no more', async (t) => {
  await server.flush()
  const { fallback, redis, admin } = await clients(t)
  const monitor = await admin.monitor()
  t.teardown(() => monitor.disconnect())
  const seen: string[][] = []
  monitor.on('monitor', (_time: string, args: string[]) => { seen.push(args) })
  await everyOperation(redis, fallback, 5)
  // MONITOR's lines arrive after the replies: one more round trip on the monitored server flushes them.
  await admin.ping()
  const end = Date.now() + 2000
  while (!seen.some((args) => args[0]?.toLowerCase() === 'ping') && Date.now() < end) await new Promise((resolve) => setTimeout(resolve, 10))
  t.ok(seen.length > 50, `commands seen (${seen.length})`)
  const newer = seen.filter((args) => {
    const name = args[0]?.toLowerCase() ?? ''
    return COMMANDS_SINCE_REDIS_6.has(name) || (SINCE_REDIS_6[name]?.(args) ?? false)
  }).map((args) => args.filter((_arg, i) => i !== 1).join(' '))
  t.same([...new Set(newer)], [], 'nothing Redis 5 would refuse')
})

t.test('a claim marked used keeps its expiry; an expired or absent claim stays absent', async (t) => {
  await server.flush()
  const { redis, admin } = await clients(t)
  const guard = createReplayGuard({ redis }, Date.now, 'test:jti:')
  t.ok(await guard.claim('a', 60_000))
  await guard.markUsed('a')
  t.ok(await guard.used('a'), 'used')
  t.notOk(await guard.claim('a', 60_000), 'a replay')
  const [key] = await admin.keys('test:jti:*')
  const left = await admin.pttl(key!)
  t.ok(left > 55_000 && left <= 60_000, `used for as long as it was claimed (${left} ms left)`)
  await guard.markUsed('never-claimed')
  t.same(await admin.keys('test:jti:*'), [key], 'an id never claimed is not written')
  t.notOk(await guard.used('never-claimed'))
})

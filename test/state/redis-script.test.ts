import t from 'tap'
import { redisNowMs, startRedis, redisClient } from '../helpers/redis.js'
import { defineScripts, integers, LUA_CLOCK_MS, redisScript } from '../../src/state/redis-script.js'

const redis = await startRedis(t)

const echo = redisScript('bffTestEcho', 1, "return { redis.call('INCR', KEYS[1]), tonumber(ARGV[1]) }")

t.test('a script is one name: defining it twice is a mistake caught at once', async (t) => {
  t.throws(() => redisScript('bffTestEcho', 1, 'return 1'), /defined twice/)
})

t.test('a script runs as a command where it is defined, as EVAL where it is not', async (t) => {
  const defined = redisClient(redis.url, { maxRetriesPerRequest: 0 })
  const bare = redisClient(redis.url, { maxRetriesPerRequest: 0 })
  t.teardown(() => { defined.disconnect(); bare.disconnect() })
  defineScripts(defined)
  t.equal(typeof (defined as unknown as Record<string, unknown>).bffTestEcho, 'function')
  t.same(integers(await echo(defined, 'bff:test:echo', 7), 2), [1, 7])
  t.equal((bare as unknown as Record<string, unknown>).bffTestEcho, undefined)
  t.same(integers(await echo(bare, 'bff:test:echo', 8), 2), [2, 8], 'the same script, sent whole')
})

const keysEcho = redisScript('bffTestKeysEcho', 'variable', 'return { #KEYS, tonumber(ARGV[1]) }')

t.test('a script with a variable number of keys takes the count first, defined or not', async (t) => {
  const defined = redisClient(redis.url, { maxRetriesPerRequest: 0 })
  const bare = redisClient(redis.url, { maxRetriesPerRequest: 0 })
  t.teardown(() => { defined.disconnect(); bare.disconnect() })
  defineScripts(defined)
  t.same(integers(await keysEcho(defined, 2, 'bff:test:a', 'bff:test:b', 5), 2), [2, 5])
  t.same(integers(await keysEcho(bare, 3, 'bff:test:a', 'bff:test:b', 'bff:test:c', 6), 2), [3, 6], 'sent whole')
})

const clock = redisScript('bffTestClock', 0, `${LUA_CLOCK_MS}return { tostring(clock_ms('')), int(clock_ms('1700000000123')), int(2^53 - 1) }`)

t.test('clock_ms: Redis\'s TIME in whole milliseconds, or the time a test gives; int prints a score exactly', async (t) => {
  const client = redisClient(redis.url, { maxRetriesPerRequest: 0 })
  t.teardown(() => { client.disconnect() })
  const before = await redisNowMs(client)
  const [now, given, largest] = await clock(client) as [string, string, string]
  const after = await redisNowMs(client)
  t.match(now, /^[0-9]+$/, `whole milliseconds: ${now}`)
  t.ok(Number(now) >= before && Number(now) <= after, 'on Redis\'s clock')
  t.equal(given, '1700000000123')
  t.equal(largest, '9007199254740991', 'not in exponent notation')
})

t.test('integers: an array of the length asked, else a TypeError', async (t) => {
  t.same(integers(['1', 2], 2), [1, 2])
  t.throws(() => integers([1, 2, 3], 2), TypeError)
  t.throws(() => integers([1], 2), TypeError)
  t.throws(() => integers('1,2', 2), TypeError)
})

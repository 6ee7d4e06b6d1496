import t, { type Test } from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { pino } from 'pino'
import { Redis } from 'ioredis'
import { startRedis, type RedisServer, redisClient } from '../helpers/redis.js'
import { buildTestApp, TEST_API_KEY } from '../helpers/app.js'
import { createSharedState, type SharedState } from '../../src/state/redis.js'
import { createAppMetrics } from '../../src/metrics.js'
import { REDACT_PATHS } from '../../src/logging.js'
import { logCapture, waitFor } from '../limits/fixtures/support.js'

/**
 * Redis holds state, not a cache: a policy that may evict keys lost Idempotency-Key records under a
 * 4 MB maxmemory (a retried key called the upstream again). The service reads the policy on every
 * connection (INFO memory), logs an error line while it is not noeviction, and exposes it.
 */

type Line = Record<string, unknown>

const EVICTION_MESSAGE = /^shared state: Redis runs with maxmemory-policy /
const UNREADABLE_MESSAGE = /^shared state: cannot read Redis's maxmemory-policy/

const evictionLines = (lines: readonly Line[]): Line[] => lines.filter((line) => EVICTION_MESSAGE.test(String(line.msg)))
const unreadableLines = (lines: readonly Line[]): Line[] => lines.filter((line) => UNREADABLE_MESSAGE.test(String(line.msg)))

/** The gauge's samples, as `policy value` pairs. */
function gaugeSamples (text: string): string[] {
  return [...text.matchAll(/^bff_redis_eviction_policy_safe\{policy="([^"]*)"\} (\S+)$/gm)].map((match) => `${match[1]} ${match[2]}`)
}

/** An admin client on `server`, closed when the test ends. */
function adminOn (t: Test, server: RedisServer): Redis {
  const admin = redisClient(server.url)
  t.teardown(() => admin.disconnect())
  return admin
}

/** A shared state on `url` logging into a capture (with the service's redaction), closed when the test ends. */
function capturedState (t: Test, url: string, policyCheckEveryMs?: number): { state: SharedState, lines: Line[] } {
  const capture = logCapture()
  const state = createSharedState({ url, log: pino({ level: 'info', redact: { paths: REDACT_PATHS, censor: '[redacted]' } }, capture.stream), ...(policyCheckEveryMs === undefined ? {} : { policyCheckEveryMs }) })
  t.teardown(() => state.close())
  return { state, lines: capture.lines }
}

t.test('a Redis started with allkeys-lru and 4 MB: an error line per connection naming the policy, the gauge at 0, nothing secret, /readyz as before', async (t) => {
  const server = await startRedis(t, { args: ['--maxmemory', '4mb', '--maxmemory-policy', 'allkeys-lru'] })
  const admin = adminOn(t, server)
  const password = 'redis-password-do-not-log-7f3a'
  await admin.call('ACL', 'SETUSER', 'bff', 'on', `>${password}`, '~*', '&*', '+@all')
  const capture = logCapture()
  const { app } = await buildTestApp(t, {
    redis: server,
    logStream: capture.stream,
    env: { REDIS_URL: `redis://bff:${password}@127.0.0.1:${server.port}` }
  })
  await waitFor(() => evictionLines(capture.lines).length >= 1)
  const [line] = evictionLines(capture.lines) as [Line]
  t.equal(line.level, 50, 'level error')
  t.match(String(line.msg), /maxmemory-policy allkeys-lru, not noeviction/, 'names the policy')
  t.match(String(line.msg), /Idempotency-Key can call Care360 a second time/, 'and what breaks')
  t.same(line.redis, { maxmemoryPolicy: 'allkeys-lru' })
  t.equal(app.sharedState.evictionPolicy?.(), 'allkeys-lru')
  t.same(gaugeSamples(await app.metrics.registry.metrics()), ['allkeys-lru 0'])

  const ready = await app.inject({ url: '/readyz' })
  t.equal(ready.statusCode, 200, 'the service runs on')
  t.equal(ready.json().data.sharedState, 'redis', '/readyz says what it said before')

  // A new connection (here the server drops the client): read again, logged again.
  await admin.call('CLIENT', 'KILL', 'USER', 'bff')
  await waitFor(() => evictionLines(capture.lines).length >= 2)
  await sleep(200)
  t.equal(evictionLines(capture.lines).length, 2, 'one line per connection')
  t.equal(unreadableLines(capture.lines).length, 0)
  const everything = JSON.stringify(capture.lines)
  t.notOk(everything.includes(password), 'the Redis password is in no log line')
  t.notOk(everything.includes(TEST_API_KEY), 'nor the org key')
  t.notOk(everything.includes(`bff:${password}`), 'nor the URL')
})

t.test('a Redis with noeviction: no error line, the gauge at 1', async (t) => {
  const server = await startRedis(t)
  const capture = logCapture()
  const { app } = await buildTestApp(t, { redis: server, logStream: capture.stream })
  await waitFor(() => app.sharedState.evictionPolicy?.() !== null)
  t.equal(app.sharedState.evictionPolicy?.(), 'noeviction')
  t.same(gaugeSamples(await app.metrics.registry.metrics()), ['noeviction 1'])
  t.same(evictionLines(capture.lines), [])
  t.same(unreadableLines(capture.lines), [])
  t.equal(capture.lines.filter((line) => Number(line.level) >= 50).length, 0, 'no error line at all')
})

t.test('the volatile-* policies evict our keys too (each has a TTL); the policy is read again on each connection', async (t) => {
  const server = await startRedis(t)
  const admin = adminOn(t, server)
  const { state, lines } = capturedState(t, server.url)
  const metrics = createAppMetrics(() => state.mode(), state.evictionPolicy)
  await waitFor(() => state.evictionPolicy?.() === 'noeviction')
  t.same(gaugeSamples(await metrics.registry.metrics()), ['noeviction 1'])

  await admin.config('SET', 'maxmemory-policy', 'volatile-ttl')
  await admin.call('CLIENT', 'KILL', 'TYPE', 'normal')
  await waitFor(() => state.evictionPolicy?.() === 'volatile-ttl')
  await waitFor(() => evictionLines(lines).length >= 1)
  t.match(String(evictionLines(lines)[0]?.msg), /maxmemory-policy volatile-ttl/)
  t.same(gaugeSamples(await metrics.registry.metrics()), ['volatile-ttl 0'])

  await admin.config('SET', 'maxmemory-policy', 'noeviction')
  await admin.call('CLIENT', 'KILL', 'TYPE', 'normal')
  await waitFor(() => state.evictionPolicy?.() === 'noeviction')
  t.same(gaugeSamples(await metrics.registry.metrics()), ['noeviction 1'], 'safe again once Redis is')
  t.equal(evictionLines(lines).length, 1, 'no line for noeviction')
})

t.test('an INFO that an ACL forbids: one warning, the connection serves on, the gauge has no sample', async (t) => {
  const server = await startRedis(t)
  const admin = adminOn(t, server)
  await admin.call('ACL', 'SETUSER', 'no-info', 'on', '>pw', '~*', '&*', '+@all', '-info')
  // ioredis's own ready check runs INFO too, and on NOPERM says so on the console, then goes on.
  const consoleWarn = console.warn
  console.warn = () => {}
  t.teardown(() => { console.warn = consoleWarn })
  const { state, lines } = capturedState(t, server.url.replace('redis://', 'redis://no-info:pw@'))
  const metrics = createAppMetrics(() => state.mode(), state.evictionPolicy)
  await waitFor(() => unreadableLines(lines).length >= 1)
  const [warning] = unreadableLines(lines) as [Line]
  t.equal(warning.level, 40, 'level warn')
  t.same(warning.redis, { cause: 'NOPERM' }, 'the error\'s code word only')
  t.equal(state.mode(), 'redis', 'the connection is ready')
  t.equal(await state.redis?.ping(), 'PONG', 'and serves')
  t.equal(state.evictionPolicy?.(), null, 'the policy is unknown')
  const text = await metrics.registry.metrics()
  t.match(text, /# TYPE bff_redis_eviction_policy_safe gauge/)
  t.same(gaugeSamples(text), [], 'unknown: no sample rather than a false 0 or 1')

  await admin.call('CLIENT', 'KILL', 'USER', 'no-info')
  await waitFor(() => state.mode() !== 'redis', 2000).catch(() => {})
  await waitFor(() => state.mode() === 'redis')
  await sleep(200)
  t.equal(unreadableLines(lines).length, 1, 'warned once, not once per connection')
  t.equal(evictionLines(lines).length, 0)
})

t.test('a policy changed on the live server is seen by the next periodic read, without a reconnection', async (t) => {
  const server = await startRedis(t)
  const admin = adminOn(t, server)
  const { state, lines } = capturedState(t, server.url, 100)
  await waitFor(() => state.evictionPolicy?.() === 'noeviction')
  await admin.config('SET', 'maxmemory-policy', 'allkeys-lfu')
  await waitFor(() => state.evictionPolicy?.() === 'allkeys-lfu')
  await waitFor(() => evictionLines(lines).length >= 1)
  t.match(String(evictionLines(lines)[0]?.msg), /maxmemory-policy allkeys-lfu/)
  t.equal(state.mode(), 'redis', 'on the same connection')

  // Reads while Redis is away fail unseen (no warning): the next connection reads again.
  await server.stop()
  await waitFor(() => state.mode() !== 'redis')
  await sleep(300)
  t.equal(unreadableLines(lines).length, 0, 'no warning for reads without a connection')
  t.equal(state.evictionPolicy?.(), 'allkeys-lfu', 'the policy last read stands')
  await server.start()
  await admin.config('SET', 'maxmemory-policy', 'noeviction')
  await waitFor(() => state.evictionPolicy?.() === 'noeviction')
})

t.test('no Redis: no policy, no sample', async (t) => {
  const state = createSharedState({ url: null, log: pino({ level: 'silent' }) })
  t.equal(state.evictionPolicy(), null)
  const metrics = createAppMetrics(() => state.mode(), state.evictionPolicy)
  t.same(gaugeSamples(await metrics.registry.metrics()), [])
})

t.test('an INFO refused again after a read that succeeded is warned about again, once', async (t) => {
  const server = await startRedis(t)
  const admin = adminOn(t, server)
  await admin.call('ACL', 'SETUSER', 'flip', 'on', '>pw', '~*', '&*', '+@all')
  const { state, lines } = capturedState(t, server.url.replace('redis://', 'redis://flip:pw@'), 100)
  await waitFor(() => state.evictionPolicy?.() === 'noeviction')
  await admin.call('ACL', 'SETUSER', 'flip', '-info')
  await waitFor(() => unreadableLines(lines).length >= 1)
  await sleep(300)
  t.equal(unreadableLines(lines).length, 1, 'one warning for the reads refused in a row')
  await admin.call('ACL', 'SETUSER', 'flip', '+info')
  await waitFor(() => state.evictionPolicy?.() === 'noeviction')
  await admin.call('ACL', 'SETUSER', 'flip', '-info')
  await waitFor(() => unreadableLines(lines).length >= 2).catch(() => {})
  t.equal(unreadableLines(lines).length, 2, 'refused again after a read that succeeded: warned again')
})

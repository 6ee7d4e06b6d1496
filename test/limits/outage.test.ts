import t from 'tap'
import { monitorEventLoopDelay, performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { pino } from 'pino'
import { dataAgeMs, startRedis, redisClient } from '../helpers/redis.js'
import { buildTestApp } from '../helpers/app.js'
import { createStoreFallback } from '../../src/limits/fallback.js'
import { REDACT_PATHS } from '../../src/logging.js'
import { integers } from '../../src/state/redis-script.js'
import { logCapture, sharedStateOn, waitFor } from './fixtures/support.js'

/**
 * The longest stall of this process's event loop while `fn` runs (ms). A request that waits on
 * Redis does not stall the loop; a CPU-starved test machine does, and delays every request by as
 * much, so bounds on waiting are checked beyond the stalls the machine itself caused.
 */
async function withStalls<T> (fn: () => Promise<T>): Promise<{ result: T, stallMs: number }> {
  const histogram = monitorEventLoopDelay({ resolution: 10 })
  histogram.enable()
  try {
    const result = await fn()
    return { result, stallMs: histogram.max / 1e6 }
  } finally {
    histogram.disable()
  }
}

const redis = await startRedis(t)

t.test('fallback: memory without Redis, after a failed command, and logged once per interval', async (t) => {
  const memoryState = await sharedStateOn(t, null)
  const memoryOnly = createStoreFallback({ sharedState: memoryState, log: pino({ level: 'silent' }) })
  t.equal(await memoryOnly.run(async () => 'redis', () => 'memory'), 'memory')
  t.equal(memoryOnly.redisFor(), 0, 'no Redis: never usable')
  memoryState.degradeFor(1000)
  t.equal(memoryState.mode(), 'memory', 'without Redis, memory is the store of record: never degraded')

  const capture = logCapture()
  let now = 0
  // The service's own redaction paths: the warning's cause must survive them.
  const log = pino({ level: 'info', redact: { paths: REDACT_PATHS, censor: '[redacted]' } }, capture.stream)
  // One clock for the fallback's log interval and the shared state's pause after a failure.
  const clock = (): number => now
  const state = await sharedStateOn(t, redis.url, 250, clock)
  const fallback = createStoreFallback({ sharedState: state, log, now: clock, pauseMs: 100, logEveryMs: 1000 })
  t.equal(await fallback.run(async () => 'redis', () => 'memory'), 'redis')
  // Since Redis's data began (the first connection): the marker's age, on this test's clock. (The
  // shared state's own script went first on the connection: its answer has been read by now.)
  const ageMs = await dataAgeMs(state.redis!)
  t.ok(Math.abs(fallback.redisFor() - ageMs) <= 1000, `no break since the data began (${fallback.redisFor()} ms)`)
  // A script that fails (here a reply of the wrong shape) is a Redis that cannot answer.
  t.equal(await fallback.run(async () => String(integers('not an array', 2)), () => 'memory'), 'memory')
  t.equal(await fallback.run(async () => 'redis', () => 'memory'), 'memory', 'Redis is left alone for pauseMs')
  t.equal(fallback.redisFor(), 0)
  now = 100
  t.equal(await fallback.run(async () => 'redis', () => 'memory'), 'redis', 'then tried again')
  now = 130
  t.equal(fallback.redisFor(), 30, 'usable again for 30 ms')
  now = 200
  await fallback.run(async () => { throw new Error('boom') }, () => 'memory')
  now = 400
  await fallback.run(async () => { throw new Error('boom') }, () => 'memory')
  now = 1200
  await fallback.run(async () => { throw new Error('boom') }, () => 'memory')
  now = 1300
  // A command that gets no answer: given up after the client's command timeout (here 250 ms).
  const began = performance.now()
  t.equal(await fallback.run(async (client) => String(await client.blpop('bff:test:never', 5)), () => 'memory'), 'memory')
  t.ok(performance.now() - began < 1000, 'within the bound')
  const warnings = capture.lines.filter((line) => line.msg === 'limits: Redis unavailable, counting in per-process memory')
  t.equal(warnings.length, 2, 'at 0, not at 200 nor 400 (same interval), at 1200, not 1300')
  t.same(warnings[0]?.limits, { cause: 'error' })
  t.equal(capture.lines.filter((line) => line.msg === 'limits: counting in Redis again').length, 1)
})

t.test('a connected Redis that answers errors: /readyz and the state metric say degraded, then redis again', async (t) => {
  await redis.flush()
  const { app } = await buildTestApp(t, { redis, env: { RATE_LIMIT_IP: '50/1m' } })
  const admin = redisClient(redis.url)
  t.teardown(async () => {
    await admin.call('ACL', 'SETUSER', 'default', '+evalsha', '+eval').catch(() => {})
    admin.disconnect()
  })
  const stateOf = async (): Promise<string> => (await app.inject({ url: '/readyz' })).json().data.sharedState
  const metricOf = async (): Promise<string> => {
    const text = await app.metrics.registry.metrics()
    return /^bff_shared_state_mode\{mode="(\w+)"\} 1$/m.exec(text)?.[1] ?? 'none'
  }
  t.equal(await stateOf(), 'redis')
  // Every script now fails (NOPERM) on a connection that stays ready, as OOM or READONLY would.
  await admin.call('ACL', 'SETUSER', 'default', '-evalsha', '-eval')
  t.equal((await app.inject({ url: '/auth/me' })).statusCode, 200, 'limits count in memory: no 5xx')
  t.equal(app.sharedState.redis?.status, 'ready', 'the connection itself is fine')
  t.equal(await stateOf(), 'degraded')
  t.equal(await metricOf(), 'degraded')
  await admin.call('ACL', 'SETUSER', 'default', '+evalsha', '+eval')
  await sleep(1100)
  t.equal((await app.inject({ url: '/auth/me' })).statusCode, 200)
  t.equal(await stateOf(), 'redis', 'once Redis answers again')
  t.equal(await metricOf(), 'redis')
})

t.test('a slow Redis: no request waits past the command bound, then Redis is left alone', async (t) => {
  await redis.flush()
  const { app } = await buildTestApp(t, { redis, env: { RATE_LIMIT_IP: '50/1m' } })
  const pauser = redisClient(redis.url)
  t.teardown(() => pauser.disconnect())
  t.equal((await app.inject({ url: '/auth/me' })).statusCode, 200, 'warm')
  await pauser.call('CLIENT', 'PAUSE', '800', 'ALL')
  const first = await withStalls(async () => {
    const started = performance.now()
    const response = await app.inject({ url: '/auth/me' })
    return { status: response.statusCode, ms: performance.now() - started }
  })
  t.equal(first.result.status, 200)
  t.ok(first.result.ms < 500 + first.stallMs, `answered from memory after the 250 ms bound (${Math.round(first.result.ms)} ms, stalls ${Math.round(first.stallMs)} ms)`)
  const next = await withStalls(async () => {
    const started = performance.now()
    const response = await app.inject({ url: '/auth/me' })
    return { status: response.statusCode, ms: performance.now() - started }
  })
  t.equal(next.result.status, 200)
  t.ok(next.result.ms < 100 + next.stallMs, `the next one does not wait for Redis at all (${Math.round(next.result.ms)} ms)`)
  await sleep(900)
})

t.test('Redis killed mid-traffic and restarted: no hang, no 5xx, limits from memory, then from Redis again', async (t) => {
  await redis.flush()
  const capture = logCapture()
  const { app } = await buildTestApp(t, { redis, logStream: capture.stream, env: { RATE_LIMIT_IP: '5/1m' } })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const address = app.server.address()
  if (address === null || typeof address === 'string') throw new Error('no port')
  const base = `http://127.0.0.1:${address.port}`

  let phase: 'up' | 'down' | 'recovering' | 'restarted' = 'up'
  const traffic = { running: true }
  const answers: Array<{ phase: string, status: number, ms: number }> = []
  async function client (): Promise<void> {
    while (traffic.running) {
      const at = phase
      const started = performance.now()
      const response = await fetch(`${base}/auth/me`, { signal: AbortSignal.timeout(3000) })
      await response.arrayBuffer()
      answers.push({ phase: at, status: response.status, ms: performance.now() - started })
      await sleep(5)
    }
  }
  const { stallMs } = await withStalls(async () => {
    const clients = Promise.all([client(), client(), client()])
    await sleep(200)
    await redis.stop()
    phase = 'down'
    await sleep(300)
    await waitFor(() => answers.filter((answer) => answer.phase === 'down').length >= 10, 4000)
    const ready = await app.inject({ url: '/readyz', remoteAddress: '192.0.2.1' })
    t.equal(ready.json().data.sharedState, 'degraded')
    // A restarted Redis is empty: what it admits from now on is counted apart.
    phase = 'recovering'
    await redis.start()
    await waitFor(() => app.sharedState.mode() === 'redis', 4000)
    // Past the fallback's pause, so that the next requests are counted in Redis.
    await sleep(1100)
    phase = 'restarted'
    await sleep(100)
    traffic.running = false
    await clients
  })

  t.ok(answers.every((answer) => answer.status === 200 || answer.status === 429), 'only 200 and 429, never a 5xx')
  const slowest = Math.max(...answers.map((answer) => answer.ms))
  t.ok(slowest < 1000 + stallMs, `no request waited past a second beyond the machine's own stalls (slowest ${Math.round(slowest)} ms, stalls ${Math.round(stallMs)} ms)`)
  const down = answers.filter((answer) => answer.phase === 'down')
  const admittedDown = down.filter((answer) => answer.status === 200).length
  t.ok(down.length >= 10, `traffic went on while Redis was down (${down.length})`)
  t.ok(admittedDown <= 5 && down.some((answer) => answer.status === 429), `limits kept working from memory (${admittedDown} admitted)`)
  const inspector = redisClient(redis.url)
  t.teardown(() => inspector.disconnect())
  t.ok(Number(await inspector.get('bff:limit:ip:127.0.0.1')) > 0, 'counted in Redis again after the restart')
  t.equal(capture.lines.filter((line) => line.msg === 'limits: Redis unavailable, counting in per-process memory').length, 1, 'the fallback logged once')
})

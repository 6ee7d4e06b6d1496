import t from 'tap'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { pino } from 'pino'
import { Redis } from 'ioredis'
import { startRedis } from '../helpers/redis.js'
import { buildTestApp } from '../helpers/app.js'
import { createStoreFallback } from '../../src/limits/fallback.js'
import { integers } from '../../src/limits/redis-script.js'
import { logCapture, sharedStateOn, waitFor } from './fixtures/support.js'

const redis = await startRedis(t)

t.test('fallback: memory without Redis, after a failed command, and logged once per interval', async (t) => {
  const memoryOnly = createStoreFallback({ sharedState: await sharedStateOn(t, null), log: pino({ level: 'silent' }) })
  t.equal(await memoryOnly.run(async () => 'redis', () => 'memory'), 'memory')

  const capture = logCapture()
  let now = 0
  const fallback = createStoreFallback({ sharedState: await sharedStateOn(t, redis.url, 250), log: pino({ level: 'info' }, capture.stream), now: () => now, pauseMs: 100, logEveryMs: 1000 })
  t.equal(await fallback.run(async () => 'redis', () => 'memory'), 'redis')
  // A script that fails (here a reply of the wrong shape) is a Redis that cannot answer.
  t.equal(await fallback.run(async () => String(integers('not an array', 2)), () => 'memory'), 'memory')
  t.equal(await fallback.run(async () => 'redis', () => 'memory'), 'memory', 'Redis is left alone for pauseMs')
  now = 100
  t.equal(await fallback.run(async () => 'redis', () => 'memory'), 'redis', 'then tried again')
  now = 200
  await fallback.run(async () => { throw new Error('boom') }, () => 'memory')
  now = 400
  await fallback.run(async () => { throw new Error('boom') }, () => 'memory')
  now = 1200
  await fallback.run(async () => { throw new Error('boom') }, () => 'memory')
  const warnings = capture.lines.filter((line) => line.msg === 'limits: Redis unavailable, counting in per-process memory')
  t.equal(warnings.length, 3, 'at 0, back to normal, at 200 (a new episode), not 400, at 1200')
  t.same(warnings[0]?.limits, { reason: 'TypeError' })
  t.equal(capture.lines.filter((line) => line.msg === 'limits: counting in Redis again').length, 1)
})

t.test('a slow Redis: no request waits past the command bound, then Redis is left alone', async (t) => {
  await redis.flush()
  const { app } = await buildTestApp(t, { redis, env: { RATE_LIMIT_IP: '50/1m' } })
  const pauser = new Redis(redis.url)
  t.teardown(() => pauser.disconnect())
  t.equal((await app.inject({ url: '/healthz' })).statusCode, 200, 'warm')
  await pauser.call('CLIENT', 'PAUSE', '800', 'ALL')
  let started = performance.now()
  const first = await app.inject({ url: '/healthz' })
  const firstMs = performance.now() - started
  t.equal(first.statusCode, 200)
  t.ok(firstMs < 1000, `answered from memory after the bound (${Math.round(firstMs)} ms)`)
  started = performance.now()
  t.equal((await app.inject({ url: '/healthz' })).statusCode, 200)
  t.ok(performance.now() - started < 200, 'the next one does not wait at all')
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
      const response = await fetch(`${base}/healthz`, { signal: AbortSignal.timeout(3000) })
      await response.arrayBuffer()
      answers.push({ phase: at, status: response.status, ms: performance.now() - started })
      await sleep(5)
    }
  }
  const clients = Promise.all([client(), client(), client()])
  await sleep(200)
  await redis.stop()
  phase = 'down'
  await sleep(800)
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

  t.ok(answers.every((answer) => answer.status === 200 || answer.status === 429), 'only 200 and 429, never a 5xx')
  const slowest = Math.max(...answers.map((answer) => answer.ms))
  t.ok(slowest < 1000, `no request waited past a second (slowest ${Math.round(slowest)} ms)`)
  const down = answers.filter((answer) => answer.phase === 'down')
  const admittedDown = down.filter((answer) => answer.status === 200).length
  t.ok(down.length > 5, `traffic went on while Redis was down (${down.length})`)
  t.ok(admittedDown <= 5 && down.some((answer) => answer.status === 429), `limits kept working from memory (${admittedDown} admitted)`)
  const inspector = new Redis(redis.url)
  t.teardown(() => inspector.disconnect())
  t.ok(Number(await inspector.get('bff:limit:ip:127.0.0.1')) > 0, 'counted in Redis again after the restart')
  t.equal(capture.lines.filter((line) => line.msg === 'limits: Redis unavailable, counting in per-process memory').length, 1, 'the fallback logged once')
})

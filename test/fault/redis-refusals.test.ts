import t, { type Test } from 'tap'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { startRedis, redisClient } from '../helpers/redis.js'
import { buildTestApp, signIn } from '../helpers/app.js'
import type { InjectOptions } from 'fastify'
import type { App } from '../../src/app.js'
import { DATA_SINCE_KEY } from '../../src/state/redis.js'

/**
 * A Redis that stays connected but refuses (README, "Redis unreachable, slow or failing"): at
 * maxmemory under noeviction (OOM), and a password changed under the service (its next
 * connection's AUTH is refused: WRONGPASS). Each: the session routes answer 503
 * SERVICE_UNAVAILABLE with Retry-After at once (sessions never fall back), the per-client limits
 * count in memory (no 5xx from them), /readyz stays 200 saying `degraded`, and the service comes
 * back by itself once Redis accepts again, the session still valid.
 */

async function timed (app: App, options: InjectOptions): Promise<{ status: number, code: string | undefined, retryAfter: string | undefined, ms: number }> {
  const started = performance.now()
  const response = await app.inject(options)
  const ms = performance.now() - started
  const body = response.body === '' ? {} : response.json() as { code?: string }
  return { status: response.statusCode, code: body.code, retryAfter: response.headers['retry-after'] as string | undefined, ms }
}

async function sharedState (app: App): Promise<string> {
  return (await app.inject({ url: '/readyz' })).json().data.sharedState
}

async function until (t: Test, what: string, check: () => Promise<boolean>, ms = 5000): Promise<void> {
  const end = Date.now() + ms
  while (Date.now() < end) {
    if (await check()) return
    await sleep(50)
  }
  t.fail(`${what} within ${ms} ms`)
}

t.test('Redis at maxmemory (OOM, noeviction): sessions 503, limits in memory, and back once it has room', async (t) => {
  const { app, issuer, redis } = await buildTestApp(t, { redis: true, logStream: { write () {} } })
  const admin = redisClient(redis!.url)
  t.teardown(async () => {
    await admin.config('SET', 'maxmemory', '0').catch(() => {})
    admin.disconnect()
  })
  const token = await signIn(app, issuer)
  const auth = { authorization: `Bearer ${token}` }
  t.equal((await timed(app, { url: '/auth/me', headers: auth })).status, 200)

  await admin.config('SET', 'maxmemory', '1')
  const me = await timed(app, { url: '/auth/me', headers: auth })
  t.same([me.status, me.code, me.retryAfter], [503, 'SERVICE_UNAVAILABLE', '1'], 'a session lookup: 503 with Retry-After')
  t.ok(me.ms < 1000, `at once (${Math.round(me.ms)} ms)`)
  const signin = await timed(app, { method: 'POST', url: '/auth/session', payload: { idToken: await issuer.sign({ email: 'p@example.com', sub: 'sub-p' }) } })
  t.same([signin.status, signin.code], [503, 'SERVICE_UNAVAILABLE'], 'a sign-in: 503')
  const anonymous = await timed(app, { url: '/appointments' })
  t.equal(anonymous.status, 401, 'a request without a session: its per-IP limit counted in memory, no 5xx')
  t.equal(await sharedState(app), 'degraded', '/readyz says degraded')
  t.equal((await app.inject({ url: '/readyz' })).statusCode, 200, 'and stays 200')

  await admin.config('SET', 'maxmemory', '0')
  await until(t, 'the session serves again', async () => (await timed(app, { url: '/auth/me', headers: auth })).status === 200)
  await until(t, '/readyz says redis', async () => await sharedState(app) === 'redis')
  // Scripts refused half-way leave nothing behind without an expiry.
  const lasting: string[] = []
  for (const key of await admin.keys('*')) if (key !== DATA_SINCE_KEY && await admin.pttl(key) < 0) lasting.push(key)
  t.same(lasting, [], 'every key but the data\'s age marker still expires')
})

t.test('the password changed under the service (WRONGPASS at reconnection): 503 at once, degraded, and back when it matches again', async (t) => {
  const password = 'first-password-0123456789'
  const server = await startRedis(t)
  const url = `redis://:${password}@127.0.0.1:${server.port}`
  const setup = redisClient(server.url)
  await setup.config('SET', 'requirepass', password)
  setup.disconnect()
  const lines: string[] = []
  const { app, issuer } = await buildTestApp(t, { redis: server, env: { REDIS_URL: url }, logStream: { write (line: string) { lines.push(line) } } })
  const admin = redisClient(url)
  t.teardown(async () => {
    await admin.config('SET', 'requirepass', password).catch(() => {})
    admin.disconnect()
  })
  const token = await signIn(app, issuer)
  const auth = { authorization: `Bearer ${token}` }
  t.equal((await timed(app, { url: '/auth/me', headers: auth })).status, 200)

  // Existing connections stay authenticated; the service's is cut, and its next AUTH refused.
  await admin.config('SET', 'requirepass', 'second-password-0123456789')
  await admin.call('CLIENT', 'KILL', 'TYPE', 'normal', 'SKIPME', 'yes')
  await until(t, 'the service sees the break', async () => await sharedState(app) === 'degraded')
  for (let i = 0; i < 3; i++) {
    const me = await timed(app, { url: '/auth/me', headers: auth })
    t.same([me.status, me.code, me.retryAfter], [503, 'SERVICE_UNAVAILABLE', '1'], 'a session lookup: 503 with Retry-After')
    t.ok(me.ms < 1000, `at once (${Math.round(me.ms)} ms)`)
    await sleep(300)
  }
  t.equal((await timed(app, { url: '/appointments' })).status, 401, 'the per-IP limit counts in memory: no 5xx')

  await admin.config('SET', 'requirepass', password)
  await until(t, 'reconnected', async () => await sharedState(app) === 'redis')
  t.equal((await timed(app, { url: '/auth/me', headers: auth })).status, 200, 'the session serves again')
  const text = lines.join('')
  t.notOk(text.includes(password) || text.includes('second-password'), 'no password in a log line')
  t.ok(/Redis unreachable/.test(text), 'the outage is told')
})

t.test('a failed command of the sign-in\'s own stores (retired ID tokens, logout marks) makes the state degraded for its pause, as a session command does', async (t) => {
  const { app, issuer, redis } = await buildTestApp(t, { redis: true, logStream: { write () {} } })
  const admin = redisClient(redis!.url)
  t.teardown(async () => {
    await admin.call('ACL', 'SETUSER', 'default', '+get').catch(() => {})
    admin.disconnect()
  })
  t.equal(await sharedState(app), 'redis')
  // The plain reads of those two stores (GET) now fail on a connection that stays ready; every
  // script still runs.
  await admin.call('ACL', 'SETUSER', 'default', '-get')
  const signin = await timed(app, { method: 'POST', url: '/auth/session', payload: { idToken: await issuer.sign({ email: 'p@example.com', sub: 'sub-p' }) } })
  t.same([signin.status, signin.code, signin.retryAfter], [503, 'SERVICE_UNAVAILABLE', '1'], 'the sign-in: 503 with Retry-After')
  t.equal(await sharedState(app), 'degraded', '/readyz says degraded, as after a failed session command')
  await admin.call('ACL', 'SETUSER', 'default', '+get')
  await until(t, '/readyz says redis again', async () => await sharedState(app) === 'redis')
  t.equal((await timed(app, { method: 'POST', url: '/auth/session', payload: { idToken: await issuer.sign({ email: 'p@example.com', sub: 'sub-p', jti: 'another' }) } })).status, 201, 'and sign-ins work')
})

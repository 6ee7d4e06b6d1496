import t, { type Test } from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import Fastify from 'fastify'
import { Gauge, Registry } from 'prom-client'
import { connect } from 'node:net'
import { once } from 'node:events'
import { buildTestApp, signIn, TEST_API_KEY } from './helpers/app.js'
import { SANDBOX_KEY, startSandbox } from './helpers/sandbox.js'
import { DEMO_PATIENTS } from '../src/care360/sandbox.js'
import { buildMetricsServer, createAppMetrics, metricsPlugin } from '../src/metrics.js'
import type { App } from '../src/app.js'
import { Browser } from './web/browser.js'
import { startWebStack } from './web/stack.js'
import { parseExposition as parse, type Sample } from './helpers/metrics.js'

/**
 * The metrics of a whole app, as Prometheus scrapes them from the separate listener: every
 * instrument with its labelled samples after real traffic, and never a personal or secret value.
 */

const alice = DEMO_PATIENTS[0]!
const aliceFirst = alice.appointments[0]!

async function scrape (t: Test, app: App): Promise<{ text: string, samples: Sample[] }> {
  const server = buildMetricsServer(app.metrics.registry)
  t.teardown(() => server.close())
  const response = await server.inject({ method: 'GET', url: '/metrics' })
  t.equal(response.statusCode, 200)
  t.equal(response.headers['content-type'], app.metrics.registry.contentType)
  return { text: response.body, samples: parse(response.body) }
}

function value (samples: Sample[], name: string, labels: Record<string, string>): number | undefined {
  return samples.find((sample) => sample.name === name &&
    Object.entries(labels).every(([key, expected]) => sample.labels[key] === expected))?.value
}

t.test('after a sign-in, a list, a cancel and a limited request, every instrument has its samples', async (t) => {
  const sandbox = await startSandbox(t)
  const { app, issuer } = await buildTestApp(t, {
    upstreamUrl: sandbox.url,
    env: { CV_API_KEY: SANDBOX_KEY, RATE_LIMIT_CANCEL: '1/1m', OWNERSHIP_CHECK: 'off' }
  })
  const token = await signIn(app, issuer, alice.email)
  const refused = await app.inject({ method: 'POST', url: '/auth/session', payload: { idToken: 'not-a-token' } })
  t.equal(refused.statusCode, 401)
  const auth = { authorization: `Bearer ${token}` }
  t.equal((await app.inject({ method: 'GET', url: '/appointments', headers: auth })).statusCode, 200)
  t.equal((await app.inject({ method: 'POST', url: `/appointments/${aliceFirst.id}/cancel`, headers: auth })).statusCode, 200)
  const limited = await app.inject({ method: 'POST', url: `/appointments/${alice.appointments[1]!.id}/cancel`, headers: auth })
  t.equal(limited.statusCode, 429)
  t.equal((await app.inject({ method: 'GET', url: `/no/such/${aliceFirst.id}` })).statusCode, 404)
  t.equal((await app.inject({ method: 'HEAD', url: '/healthz' })).statusCode, 200)

  const { text, samples } = await scrape(t, app)
  const count = (labels: Record<string, string>) => value(samples, 'http_request_duration_seconds_count', labels)
  t.equal(count({ method: 'POST', route: '/auth/session', status_code: '201' }), 1)
  t.equal(count({ method: 'POST', route: '/auth/session', status_code: '401' }), 1)
  t.equal(count({ method: 'GET', route: '/appointments', status_code: '200' }), 1)
  t.equal(count({ method: 'POST', route: '/appointments/:id/cancel', status_code: '200' }), 1)
  t.equal(count({ method: 'POST', route: '/appointments/:id/cancel', status_code: '429' }), 1)
  t.equal(count({ method: 'GET', route: 'not_found', status_code: '404' }), 1)
  t.equal(count({ method: 'HEAD', route: '/healthz', status_code: '200' }), 1, 'the HEAD twin of a GET, counted once')
  t.ok((value(samples, 'http_request_duration_seconds_sum', { route: '/appointments' }) ?? 0) > 0)

  t.equal(value(samples, 'care360_upstream_duration_seconds_count', { endpoint: 'list', outcome: 'ok' }), 1)
  t.equal(value(samples, 'care360_upstream_duration_seconds_count', { endpoint: 'cancel', outcome: 'ok' }), 1)
  t.equal(value(samples, 'care360_upstream_duration_seconds_bucket', { endpoint: 'cancel', outcome: 'ok', le: '+Inf' }), 1)

  const decisions = (scope: string, decision: string) => value(samples, 'bff_limiter_decisions_total', { scope, decision })
  t.equal(decisions('ip', 'allowed'), 6, 'every request but the probe')
  t.equal(decisions('ip', 'limited'), 0)
  t.equal(decisions('session', 'allowed'), 3)
  t.equal(decisions('cancel', 'allowed'), 1)
  t.equal(decisions('cancel', 'limited'), 1)
  t.equal(decisions('cooldown', 'allowed'), 2)
  t.equal(decisions('org_budget', 'allowed'), 2)
  t.equal(decisions('org_budget', 'limited'), 0)
  t.equal(value(samples, 'bff_org_budget_remaining', {}), 448, 'two of 450 spent')
  t.equal(value(samples, 'bff_upstream_cooldown_active', {}), 0)

  t.equal(value(samples, 'bff_signins_total', { method: 'mobile', result: 'success' }), 1)
  t.equal(value(samples, 'bff_signins_total', { method: 'mobile', result: 'failure' }), 1)
  t.equal(value(samples, 'bff_signins_total', { method: 'web', result: 'success' }), 0)
  t.same(['redis', 'degraded', 'memory'].map((mode) => value(samples, 'bff_shared_state_mode', { mode })), [0, 0, 1])

  for (const name of ['process_cpu_user_seconds_total', 'process_resident_memory_bytes', 'nodejs_eventloop_lag_seconds', 'nodejs_heap_size_used_bytes']) {
    t.ok(samples.some((sample) => sample.name === name), `default metric ${name}`)
  }

  const labelValues = samples.flatMap((sample) => Object.values(sample.labels)).join('\n')
  for (const secret of [alice.email, token, aliceFirst.id, alice.appointments[1]!.id, SANDBOX_KEY, TEST_API_KEY]) {
    t.notOk(labelValues.includes(secret), 'no label carries an email, a token, an id or a key')
    t.notOk(text.includes(secret), 'nor does anything else in the scrape')
  }
})

t.test('a sign-in a limiter refused (429) was never tried: no sign-in counted', async (t) => {
  const { app, issuer } = await buildTestApp(t, { env: { RATE_LIMIT_IP: '1/1m' } })
  t.equal((await app.inject({ method: 'POST', url: '/auth/session', payload: { idToken: await issuer.sign() } })).statusCode, 201)
  t.equal((await app.inject({ method: 'POST', url: '/auth/session', payload: { idToken: await issuer.sign() } })).statusCode, 429)
  const { samples } = await scrape(t, app)
  t.equal(value(samples, 'bff_signins_total', { method: 'mobile', result: 'success' }), 1)
  t.equal(value(samples, 'bff_signins_total', { method: 'mobile', result: 'failure' }), 0)
})

t.test('the public app has no /metrics; the metrics listener has nothing else', async (t) => {
  const { app } = await buildTestApp(t)
  t.equal((await app.inject({ method: 'GET', url: '/metrics' })).statusCode, 404)
  const server = buildMetricsServer(app.metrics.registry)
  t.teardown(() => server.close())
  t.equal((await server.inject({ method: 'GET', url: '/healthz' })).statusCode, 404)
  t.equal((await server.inject({ method: 'POST', url: '/metrics' })).statusCode, 404)
  const { samples } = await scrape(t, app)
  t.equal(value(samples, 'http_request_duration_seconds_count', { route: 'not_found', status_code: '404' }), 1, 'the refused /metrics is a not_found')
})

t.test('two apps in one process keep their own counts', async (t) => {
  const one = await buildTestApp(t)
  const two = await buildTestApp(t)
  await one.app.inject({ method: 'GET', url: '/healthz' })
  t.not(one.app.metrics.registry, two.app.metrics.registry)
  t.equal(value((await scrape(t, one.app)).samples, 'http_request_duration_seconds_count', { route: '/healthz' }), 1)
  t.equal(value((await scrape(t, two.app)).samples, 'http_request_duration_seconds_count', { route: '/healthz' }), undefined)
})

t.test('org budget refusals, the upstream cooldown and its gauge', async (t) => {
  const sandbox = await startSandbox(t)
  const { app, issuer } = await buildTestApp(t, {
    upstreamUrl: sandbox.url,
    env: { CV_API_KEY: SANDBOX_KEY, CV_RATE_LIMIT: '2/1m' }
  })
  const auth = { authorization: `Bearer ${await signIn(app, issuer, alice.email)}` }
  const list = async () => (await app.inject({ method: 'GET', url: '/appointments', headers: auth })).statusCode
  sandbox.control.setFailure({ kind: 'rate-limited', retryAfter: '30', times: 1 })
  t.equal(await list(), 429, 'the upstream said 429: a cooldown starts')
  t.equal(await list(), 429, 'stopped by the cooldown')
  let { samples } = await scrape(t, app)
  t.equal(value(samples, 'care360_upstream_duration_seconds_count', { endpoint: 'list', outcome: 'rate_limited' }), 1)
  t.equal(value(samples, 'bff_limiter_decisions_total', { scope: 'cooldown', decision: 'limited' }), 1)
  t.equal(value(samples, 'bff_upstream_cooldown_active', {}), 1)

  // A second app on its own budget of two: the third call is refused by the budget.
  const other = await buildTestApp(t, { upstreamUrl: sandbox.url, env: { CV_API_KEY: SANDBOX_KEY, CV_RATE_LIMIT: '2/1m', OWNERSHIP_CHECK: 'off' } })
  const otherAuth = { authorization: `Bearer ${await signIn(other.app, other.issuer, alice.email)}` }
  for (let i = 0; i < 3; i++) await other.app.inject({ method: 'GET', url: '/appointments', headers: otherAuth })
  ;({ samples } = await scrape(t, other.app))
  t.equal(value(samples, 'bff_limiter_decisions_total', { scope: 'org_budget', decision: 'allowed' }), 2)
  t.equal(value(samples, 'bff_limiter_decisions_total', { scope: 'org_budget', decision: 'limited' }), 1)
  t.equal(value(samples, 'bff_org_budget_remaining', {}), 0)
})

for (const redis of [false, true]) {
  t.test(`the org budget's gauge refills as its window slides, with no call made (${redis ? 'Redis' : 'memory'})`, async (t) => {
    const sandbox = await startSandbox(t)
    const { app, issuer } = await buildTestApp(t, { redis, upstreamUrl: sandbox.url, env: { CV_API_KEY: SANDBOX_KEY, CV_RATE_LIMIT: '2/1s' } })
    const auth = { authorization: `Bearer ${await signIn(app, issuer, alice.email)}` }
    const budget = async () => value((await scrape(t, app)).samples, 'bff_org_budget_remaining', {})
    t.equal(await budget(), 2, 'before any call')
    for (let i = 0; i < 2; i++) t.equal((await app.inject({ method: 'GET', url: '/appointments', headers: auth })).statusCode, 200)
    t.equal(await budget(), 0, 'both spent')
    await sleep(1100)
    t.equal(await budget(), 2, 'a window later')
  })
}

t.test('the shared state mode follows Redis', async (t) => {
  const { app, redis } = await buildTestApp(t, { redis: true })
  let { samples } = await scrape(t, app)
  t.same(['redis', 'degraded', 'memory'].map((mode) => value(samples, 'bff_shared_state_mode', { mode })), [1, 0, 0])
  await redis!.stop()
  const end = Date.now() + 5000
  while (app.sharedState.mode() === 'redis' && Date.now() < end) await new Promise((resolve) => setTimeout(resolve, 10))
  ;({ samples } = await scrape(t, app))
  t.same(['redis', 'degraded', 'memory'].map((mode) => value(samples, 'bff_shared_state_mode', { mode })), [0, 1, 0])
})

t.test('the cooldown gauge stays 1 through a Redis outage while this process still holds calls back', async (t) => {
  const sandbox = await startSandbox(t)
  const { app, issuer, redis } = await buildTestApp(t, { redis: true, upstreamUrl: sandbox.url, env: { CV_API_KEY: SANDBOX_KEY } })
  const auth = { authorization: `Bearer ${await signIn(app, issuer, alice.email)}` }
  sandbox.control.setFailure({ kind: 'rate-limited', retryAfter: '30', times: 1 })
  t.equal((await app.inject({ method: 'GET', url: '/appointments', headers: auth })).statusCode, 429, 'a cooldown starts, in Redis')
  await redis!.stop()
  const end = Date.now() + 5000
  while (app.sharedState.mode() === 'redis' && Date.now() < end) await new Promise((resolve) => setTimeout(resolve, 10))
  // The fallback's own cooldown never heard of it (before: the gauge read 0 here)...
  t.equal(value((await scrape(t, app)).samples, 'bff_upstream_cooldown_active', {}), 1)
  // ...while the gate still refuses every upstream call for it.
  t.ok(app.upstreamGate.coolingMs() > 25_000, 'the gate holds calls back for the cooldown it saw')
})

t.test('web sign-ins: a success and a failure', async (t) => {
  const stack = await startWebStack(t)
  const browser = new Browser()
  const page = await stack.signIn(browser, 'alice@example.com')
  t.equal(page.url, `${stack.publicUrl}/`, 'signed in: back at returnTo')
  const failed = await stack.app.inject({ method: 'GET', url: '/auth/callback?error=access_denied&state=x' })
  t.equal(failed.statusCode, 302)
  const { samples } = await scrape(t, stack.app)
  t.equal(value(samples, 'bff_signins_total', { method: 'web', result: 'success' }), 1)
  t.equal(value(samples, 'bff_signins_total', { method: 'web', result: 'failure' }), 1)
  t.equal(value(samples, 'bff_signins_total', { method: 'mobile', result: 'failure' }), 0)
})

t.test('the plugin on a bare Fastify: no shared state, no cooldown source, routes with hooks of their own', async (t) => {
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(metricsPlugin)
  const seen: string[] = []
  app.get('/one', { onResponse: function one (_request, _reply, done) { seen.push('one'); done() } }, async () => 'one')
  app.get('/two', { onResponse: [function two (_request, _reply, done) { seen.push('two'); done() }] }, async () => 'two')
  await app.inject({ method: 'GET', url: '/one' })
  await app.inject({ method: 'GET', url: '/two' })
  await app.inject({ method: 'GET', url: '/two' })
  t.same(seen, ['one', 'two', 'two'], "the routes' own hooks still run")
  const samples = parse(await app.metrics.registry.metrics())
  t.equal(value(samples, 'http_request_duration_seconds_count', { route: '/one' }), 1)
  t.equal(value(samples, 'http_request_duration_seconds_count', { route: '/two', status_code: '200' }), 2)
  t.same(['redis', 'degraded', 'memory'].map((mode) => value(samples, 'bff_shared_state_mode', { mode })), [0, 0, 0])
  t.equal(value(samples, 'bff_upstream_cooldown_active', {}), 0)
})

t.test('createAppMetrics records what it is told, on its own registry', async (t) => {
  const metrics = createAppMetrics(() => 'degraded')
  metrics.observeUpstream('cancel', 'timeout', 5)
  metrics.observeUpstream('cancel', 'timeout', 1)
  metrics.recordLimiter('ip', true)
  metrics.recordSignIn('web', true)
  metrics.watchCooldown(async () => 1500)
  const samples = parse(await metrics.registry.metrics())
  t.equal(value(samples, 'care360_upstream_duration_seconds_count', { endpoint: 'cancel', outcome: 'timeout' }), 2)
  t.equal(value(samples, 'care360_upstream_duration_seconds_sum', { endpoint: 'cancel', outcome: 'timeout' }), 6)
  t.equal(value(samples, 'bff_limiter_decisions_total', { scope: 'ip', decision: 'limited' }), 1)
  t.equal(value(samples, 'bff_signins_total', { method: 'web', result: 'success' }), 1)
  t.equal(value(samples, 'bff_upstream_cooldown_active', {}), 1)
  t.equal(value(samples, 'bff_shared_state_mode', { mode: 'degraded' }), 1)
})

t.test('createAppMetrics: each outcome of an endpoint has its own series, and a count is never added twice across scrapes', async (t) => {
  const metrics = createAppMetrics(null)
  metrics.observeUpstream('list', 'ok', 1)
  metrics.observeUpstream('list', 'timeout', 2)
  metrics.recordLimiter('session', false)
  metrics.recordLimiter('session', false)
  const first = parse(await metrics.registry.metrics())
  t.equal(value(first, 'care360_upstream_duration_seconds_count', { endpoint: 'list', outcome: 'ok' }), 1)
  t.equal(value(first, 'care360_upstream_duration_seconds_count', { endpoint: 'list', outcome: 'timeout' }), 1)
  t.equal(value(first, 'bff_limiter_decisions_total', { scope: 'session', decision: 'allowed' }), 2)
  const second = parse(await metrics.registry.metrics())
  t.equal(value(second, 'bff_limiter_decisions_total', { scope: 'session', decision: 'allowed' }), 2, 'a second scrape adds nothing')
  metrics.recordLimiter('session', false)
  const third = parse(await metrics.registry.metrics())
  t.equal(value(third, 'bff_limiter_decisions_total', { scope: 'session', decision: 'allowed' }), 3, 'only what came since')
})

t.test('the metrics listener answers as the public port does: request ids, no-store, the envelope', async (t) => {
  const registry = new Registry()
  const server = buildMetricsServer(registry)
  t.teardown(() => server.close())
  const scraped = await server.inject({ method: 'GET', url: '/metrics', headers: { 'x-request-id': 'scrape-1' } })
  t.equal(scraped.statusCode, 200)
  t.equal(scraped.headers['x-request-id'], 'scrape-1')
  t.equal(scraped.headers['cache-control'], 'no-store')
  const missing = await server.inject({ method: 'GET', url: '/nope?x=1' })
  t.equal(missing.statusCode, 404)
  t.match(missing.headers['x-request-id'], /^[0-9a-f-]{36}$/)
  t.same(missing.json(), { status: 404, success: false, message: 'No route GET /nope; metrics are at GET /metrics', code: 'NOT_FOUND' })
  for (const payload of ['{', JSON.stringify({ pad: 'x'.repeat(2_000_000) })]) {
    const posted = await server.inject({ method: 'POST', url: '/x', headers: { 'content-type': 'application/json' }, payload })
    t.equal(posted.statusCode, 404, `a body of ${payload.length} bytes to no route: 404, not 500`)
    t.equal(posted.json().code, 'NOT_FOUND')
  }
  // Refused before routing, or by the HTTP parser, on a real socket: the same envelope.
  const badUrl = await server.inject({ method: 'GET', url: '/%zz' })
  t.equal(badUrl.statusCode, 400)
  t.equal(badUrl.headers['cache-control'], 'no-store')
  t.match(badUrl.headers['x-request-id'], /^[0-9a-f-]{36}$/)
  t.match(badUrl.json(), { code: 'VALIDATION_FAILED' })
  await server.listen({ host: '127.0.0.1', port: 0 })
  const { port } = server.server.address() as { port: number }
  for (const [raw, status] of [['NOT HTTP\r\n\r\n', 400], [`GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`, 431], ['GET /metrics HTTP/1.1\r\nHost: x\r\nExpect: other\r\n\r\n', 417], ['CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n', 400]] as const) {
    const answer = await rawAnswer(port, raw)
    t.match(answer, new RegExp(`^HTTP/1\\.1 ${status} `), `${status} on the metrics port`)
    t.match(answer, /cache-control: no-store/)
    t.match(answer, /x-request-id: [0-9a-f-]{36}/)
    t.match(answer, /"code":"VALIDATION_FAILED"/)
  }
  // The public listener's refusals of faulty framing and Host (answers.ts), each closing its
  // connection with nothing pipelined behind it answered.
  const behind = 'GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n'
  for (const [raw, status, why] of [
    ['GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n', 400, 'two Hosts'],
    ['GET /metrics HTTP/1.1\r\n\r\n', 400, 'no Host'],
    ['GET /metrics HTTP/1.1\r\nHost: user@a\r\n\r\n', 400, 'a Host that is no host'],
    ['POST /metrics HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n', 400, 'Transfer-Encoding in HTTP/1.0'],
    ['POST /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n', 501, 'a transfer coding not understood']
  ] as const) {
    const answer = await rawAnswer(port, raw + behind)
    t.match(answer, new RegExp(`^HTTP/1\\.1 ${status} `), `${why}: ${status} on the metrics port`)
    t.match(answer, /\r\nconnection: close\r\n/i, `${why}: the connection closes`)
    t.match(answer, /"code":"VALIDATION_FAILED"/)
    t.equal(answer.match(/HTTP\/1\.1 /g)?.length, 1, `${why}: nothing behind it answered`)
  }
  // A collector that throws: a 500 in the envelope, its text kept from the scraper.
  registry.registerMetric(new Gauge({ name: 'broken', help: 'throws when collected', registers: [], collect () { throw new Error('collector detail') } }))
  const failed = await server.inject({ method: 'GET', url: '/metrics' })
  t.equal(failed.statusCode, 500)
  t.same(failed.json(), { status: 500, success: false, message: 'Internal Server Error', code: 'INTERNAL_ERROR' })
})

/** Writes `text` on a fresh connection and reads until the server closes it. */
async function rawAnswer (port: number, text: string): Promise<string> {
  const socket = connect(port, '127.0.0.1')
  let answer = ''
  socket.on('data', (chunk: Buffer) => { answer += chunk.toString() })
  socket.on('error', () => {})
  socket.write(text)
  await once(socket, 'close')
  return answer
}

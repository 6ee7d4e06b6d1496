import t, { type Test } from 'tap'
import { readFileSync } from 'node:fs'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { redisClient } from './helpers/redis.js'
import { buildTestApp, signIn } from './helpers/app.js'
import { freePort } from './helpers/ports.js'
import { SANDBOX_KEY, startSandbox } from './helpers/sandbox.js'
import { DEMO_PATIENTS } from '../src/care360/sandbox.js'
import { buildMetricsServer, createAppMetrics } from '../src/metrics.js'
import { startWebStack } from './web/stack.js'
import type { App } from '../src/app.js'
import { parseExposition as parse, type Sample } from './helpers/metrics.js'

/**
 * The metrics from an on-call operator's view (issue #7): scraped from the metrics listener on a
 * real socket, the series an alert needs present from the first scrape, every exported bff_*
 * metric documented, and a limiter's refusal counted as a limiter decision only.
 */

const alice = DEMO_PATIENTS[0]!

/** GET /metrics on a listening metrics server, over a real loopback socket. */
async function scrape (t: Test, app: App): Promise<{ text: string, samples: Sample[] }> {
  const server = buildMetricsServer(app.metrics.registry)
  t.teardown(() => server.close())
  await server.listen({ host: '127.0.0.1', port: 0 })
  const { port } = server.server.address() as { port: number }
  const response = await fetch(`http://127.0.0.1:${port}/metrics`, { signal: AbortSignal.timeout(5000) })
  t.equal(response.status, 200)
  const text = await response.text()
  return { text, samples: parse(text) }
}

function value (samples: Sample[], name: string, labels: Record<string, string>): number | undefined {
  return samples.find((sample) => sample.name === name &&
    Object.entries(labels).every(([key, expected]) => sample.labels[key] === expected))?.value
}

t.test('the first scrape already holds, at 0, every upstream outcome and every refusal before routing an alert would watch', async (t) => {
  const { app } = await buildTestApp(t)
  const { samples } = await scrape(t, app)
  // A series that appears with its first event at 1 hides that event from increase()/rate():
  // the first upstream auth failure (a wrong key) after a deploy, the first timeout.
  for (const endpoint of ['cancel', 'list']) {
    for (const outcome of ['ok', 'rejected', 'auth_failed', 'rate_limited', 'error', 'unavailable', 'timeout']) {
      t.equal(value(samples, 'care360_upstream_duration_seconds_count', { endpoint, outcome }), 0, `care360_upstream_duration_seconds{endpoint="${endpoint}",outcome="${outcome}"} at 0`)
      t.equal(value(samples, 'care360_upstream_duration_seconds_bucket', { endpoint, outcome, le: '+Inf' }), 0)
    }
  }
  for (const status of ['400', '408', '417', '431']) {
    t.equal(value(samples, 'bff_http_refused_before_routing_total', { status_code: status }), 0, `bff_http_refused_before_routing_total{status_code="${status}"} at 0`)
  }
})

t.test("README's Operations section documents every exported bff_* metric and the request and upstream histograms", async (t) => {
  const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8')
  const start = readme.indexOf('\n## Operations\n')
  t.ok(start >= 0, 'README has an Operations section')
  const end = readme.indexOf('\n## ', start + 1)
  const operations = readme.slice(start, end === -1 ? undefined : end)
  const metrics = createAppMetrics(() => 'redis', () => 'noeviction')
  const names = (await metrics.registry.getMetricsAsJSON()).map((metric) => metric.name)
    .filter((name) => name.startsWith('bff_') || name === 'http_request_duration_seconds' || name === 'care360_upstream_duration_seconds')
  t.ok(names.length >= 9)
  for (const name of names) t.ok(operations.includes(`\`${name}`), `${name} is named in README's Operations section`)
})

t.test('a web sign-in the per-IP limiter refused (429) is a limiter decision, not a failed sign-in (as on mobile)', async (t) => {
  const stack = await startWebStack(t, { env: { RATE_LIMIT_IP: '1/1m' } })
  const first = await stack.app.inject({ method: 'GET', url: '/auth/login' })
  t.equal(first.statusCode, 302)
  const refused = await stack.app.inject({ method: 'GET', url: '/auth/login' })
  t.equal(refused.statusCode, 302)
  t.match(refused.headers.location, /signin_error=rate_limited/)
  const callback = await stack.app.inject({ method: 'GET', url: '/auth/callback?code=x&state=y' })
  t.match(callback.headers.location, /signin_error=rate_limited/)
  const { samples } = await scrape(t, stack.app)
  t.equal(value(samples, 'bff_limiter_decisions_total', { scope: 'ip', decision: 'limited' }), 2, 'two refusals by the per-IP limit')
  t.equal(value(samples, 'bff_signins_total', { method: 'web', result: 'failure' }), 0, 'no sign-in was tried: none failed')
  t.equal(value(samples, 'bff_signins_total', { method: 'web', result: 'success' }), 0)
})

t.test('a scrape answers within a second while Redis is paused (SIGSTOP), reports degraded, and redis again once it resumes', async (t) => {
  // A redis-server of this test's own: the shared helper's cannot be paused.
  const port = await freePort()
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--protected-mode', 'no'], { stdio: 'ignore' })
  t.teardown(async () => {
    if (child.exitCode !== null) return
    const exited = once(child, 'exit')
    child.kill('SIGCONT')
    child.kill('SIGKILL')
    await exited
  })
  const until = Date.now() + 5000
  for (;;) {
    const probe = redisClient({ port, host: '127.0.0.1', lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null })
    try {
      await probe.connect()
      probe.disconnect()
      break
    } catch {
      probe.disconnect()
      if (Date.now() > until) throw new Error('redis-server did not start')
      await sleep(20)
    }
  }
  const redis = { url: `redis://127.0.0.1:${port}`, port, stop: async () => {}, start: async () => {}, flush: async () => {} }
  const { app } = await buildTestApp(t, { redis })
  const server = buildMetricsServer(app.metrics.registry)
  t.teardown(() => server.close())
  await server.listen({ host: '127.0.0.1', port: 0 })
  const metricsPort = (server.server.address() as { port: number }).port
  const mode = (samples: Sample[]) => ['redis', 'degraded', 'memory'].map((name) => value(samples, 'bff_shared_state_mode', { mode: name }))
  const timed = async () => {
    const started = Date.now()
    const response = await fetch(`http://127.0.0.1:${metricsPort}/metrics`, { signal: AbortSignal.timeout(5000) })
    const samples = parse(await response.text())
    return { status: response.status, ms: Date.now() - started, samples }
  }
  t.same(mode((await timed()).samples), [1, 0, 0])
  child.kill('SIGSTOP')
  const paused = await Promise.all([timed(), timed(), timed()])
  for (const scraped of paused) {
    t.equal(scraped.status, 200)
    t.ok(scraped.ms < 1500, `answered in ${scraped.ms} ms with Redis paused`)
  }
  const again = await timed()
  t.ok(again.ms < 1500, `and again in ${again.ms} ms`)
  t.same(mode(again.samples), [0, 1, 0], 'degraded while Redis does not answer')
  t.equal(value(again.samples, 'bff_org_budget_remaining', {}), 450, "this process's count")
  child.kill('SIGCONT')
  const back = Date.now() + 8000
  let now = mode((await timed()).samples)
  while (now[0] !== 1 && Date.now() < back) {
    await sleep(100)
    now = mode((await timed()).samples)
  }
  t.same(now, [1, 0, 0], 'redis again once it answers')
})

t.test('each cancel outcome on the real sandbox: one upstream observation by outcome, one request by status', async (t) => {
  const sandbox = await startSandbox(t)
  const { app, issuer } = await buildTestApp(t, {
    upstreamUrl: sandbox.url,
    env: { CV_API_KEY: SANDBOX_KEY, CV_TIMEOUT_MS: '300', OWNERSHIP_CHECK: 'off', RATE_LIMIT_CANCEL: '100/1m' }
  })
  const auth = { authorization: `Bearer ${await signIn(app, issuer, alice.email)}` }
  const cases = [
    { failure: { kind: 'status', status: 400, body: { status: 400, success: false, message: 'no' } }, status: 400, outcome: 'rejected' },
    { failure: { kind: 'status', status: 401 }, status: 502, outcome: 'auth_failed' },
    { failure: { kind: 'status', status: 503 }, status: 502, outcome: 'error' },
    { failure: { kind: 'slow', delayMs: 1000 }, status: 504, outcome: 'timeout' },
    { failure: { kind: 'reset' }, status: 502, outcome: 'error' },
    { failure: null, status: 200, outcome: 'ok' }
  ] as const
  for (const { failure, status } of cases) {
    if (failure !== null) sandbox.control.setFailure({ ...failure, endpoint: 'cancel', times: 1 } as Parameters<typeof sandbox.control.setFailure>[0])
    // The upstream cancels one of alice's own appointments; a failure answers before it looks.
    const id = failure === null ? alice.appointments[0]!.id : randomUUID()
    const answer = await app.inject({ method: 'POST', url: `/appointments/${id}/cancel`, headers: auth })
    t.equal(answer.statusCode, status, `${failure?.kind ?? 'no failure'}: ${status}`)
  }
  const { samples, text } = await scrape(t, app)
  const upstream = (outcome: string) => value(samples, 'care360_upstream_duration_seconds_count', { endpoint: 'cancel', outcome })
  t.same(['ok', 'rejected', 'auth_failed', 'error', 'timeout', 'rate_limited', 'unavailable'].map(upstream), [1, 1, 1, 2, 1, 0, 0])
  const requests = (status: string) => value(samples, 'http_request_duration_seconds_count', { method: 'POST', route: '/appointments/:id/cancel', status_code: status })
  t.same(['200', '400', '502', '504'].map(requests), [1, 1, 3, 1])
  t.equal(value(samples, 'bff_limiter_decisions_total', { scope: 'org_budget', decision: 'allowed' }), 6, 'one budget decision per call')
  t.notOk(text.includes(alice.email), 'no email in the scrape')
})

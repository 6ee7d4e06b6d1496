import t, { type Test } from 'tap'
import { readFileSync } from 'node:fs'
import { buildTestApp } from './helpers/app.js'
import { buildMetricsServer, createAppMetrics } from '../src/metrics.js'
import { startWebStack } from './web/stack.js'
import type { App } from '../src/app.js'

/**
 * The metrics from an on-call operator's view (issue #7): scraped from the metrics listener on a
 * real socket, the series an alert needs present from the first scrape, every exported bff_*
 * metric documented, and a limiter's refusal counted as a limiter decision only.
 */

interface Sample { name: string, labels: Record<string, string>, value: number }

function parse (text: string): Sample[] {
  const samples: Sample[] = []
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line)
    if (match === null) throw new Error(`unparsable line: ${line}`)
    const labels: Record<string, string> = {}
    for (const pair of (match[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"/g)) labels[pair[1]!] = pair[2]!
    samples.push({ name: match[1]!, labels, value: Number(match[3]) })
  }
  return samples
}

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

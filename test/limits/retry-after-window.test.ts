import t, { type Test } from 'tap'
import type { LightMyRequestResponse } from 'fastify'
import { createServer } from 'node:http'
import { parseItem, parseList, type Item } from 'structured-headers'
import { buildTestApp, signIn } from '../helpers/app.js'

/**
 * draft-ietf-httpapi-ratelimit-headers-11, section 6: "If a response contains both the Retry-After
 * and the RateLimit header fields, the Retry-After field value SHOULD NOT reference a point in
 * time earlier than the end of the effective window." A policy the answer reports as spent
 * (r=0) refuses the client's next request until its window ends: a Retry-After shorter than that
 * window sends the client back into that policy's 429.
 */
function spentUntil (headers: Record<string, unknown>): number {
  let latest = 0
  for (const item of parseList(String(headers.ratelimit)) as Item[]) {
    const params = item[1]
    if (params.get('r') === 0) latest = Math.max(latest, params.get('t') as number)
  }
  return latest
}

t.test('a per-session 429 whose answer reports the per-IP policy spent: Retry-After reaches the end of that window', async (t) => {
  const start = Date.now()
  const { app, issuer } = await buildTestApp(t, { now: () => start, env: { RATE_LIMIT_IP: '3/1m', RATE_LIMIT_SESSION: '1/10s' } })
  const token = await signIn(app, issuer, 'window@example.com')
  const me = { url: '/auth/me', headers: { authorization: `Bearer ${token}` } }
  t.equal((await app.inject(me)).statusCode, 200)
  const refused = await app.inject(me)
  t.equal(refused.statusCode, 429)
  t.equal(spentUntil(refused.headers), 60, 'the answer says: no request of this address before 60 s')
  t.ok(parseItem(String(refused.headers['retry-after']))[0] as number >= 60, `Retry-After ${String(refused.headers['retry-after'])} is not earlier than the per-IP window's end`)
})

/**
 * An upstream answering every call 429 with `Retry-After: retryAfter`, behind the app with a
 * per-IP limit of 2 a minute: the sign-in and the list call spend it, so the list's 429 reports
 * the per-IP policy spent for 60 s.
 */
async function listBehindUpstream429 (t: Test, retryAfter: string): Promise<LightMyRequestResponse> {
  const upstream = createServer((_req, res) => {
    res.writeHead(429, { 'content-type': 'application/json', 'retry-after': retryAfter })
    res.end('{"success":false}')
  })
  await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve))
  t.teardown(() => upstream.close())
  const { app, issuer } = await buildTestApp(t, { upstreamUrl: `http://127.0.0.1:${(upstream.address() as { port: number }).port}`, env: { RATE_LIMIT_IP: '2/1m' } })
  const token = await signIn(app, issuer, 'cooldown@example.com')
  const list = await app.inject({ url: '/appointments', headers: { authorization: `Bearer ${token}` } })
  t.equal(list.statusCode, 429)
  t.equal(list.json().code, 'UPSTREAM_RATE_LIMITED')
  t.equal(spentUntil(list.headers), 60)
  return list
}

t.test('an upstream 429 (UPSTREAM_RATE_LIMITED) whose answer reports the per-IP policy spent: Retry-After reaches the end of that window', async (t) => {
  const list = await listBehindUpstream429(t, '7')
  t.ok(parseItem(String(list.headers['retry-after']))[0] as number >= 60, `Retry-After ${String(list.headers['retry-after'])} is not earlier than the per-IP window's end`)
})

t.test('an upstream 429 asking for longer than the spent window keeps its own Retry-After', async (t) => {
  const list = await listBehindUpstream429(t, '120')
  t.equal(list.headers['retry-after'], '120', 'the longer wait stands')
})

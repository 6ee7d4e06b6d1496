import t, { type Test } from 'tap'
import { createServer, type AddressInfo } from 'node:net'
import { once } from 'node:events'
import { setTimeout as sleep } from 'node:timers/promises'
import type { LightMyRequestResponse } from 'fastify'
import { buildTestApp, signIn } from '../helpers/app.js'

/**
 * The upstream's Retry-After through the app (README, Rate limits: clamped to 1 s–10 min): a raw
 * upstream answering every call 429 with `retryAfter`, counting the calls it gets.
 */
async function behind429 (t: Test, retryAfter: string): Promise<{ patient: (email: string) => Promise<() => Promise<LightMyRequestResponse>>, calls: () => number }> {
  let calls = 0
  const server = createServer((socket) => {
    socket.on('error', () => {})
    socket.once('data', () => {
      calls += 1
      socket.end(`HTTP/1.1 429 Too Many Requests\r\nretry-after: ${retryAfter}\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}`)
    })
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.teardown(() => server.close())
  const { app, issuer } = await buildTestApp(t, { upstreamUrl: `http://127.0.0.1:${(server.address() as AddressInfo).port}` })
  return {
    calls: () => calls,
    // Signed in ahead, so that the calls the test times are the lists alone.
    async patient (email) {
      const token = await signIn(app, issuer, email)
      return async () => await app.inject({ url: '/appointments', headers: { authorization: `Bearer ${token}` } })
    }
  }
}

t.test('a day-long Retry-After is a ten-minute cooldown: the client is told 600 s, and nobody calls the upstream meanwhile', async (t) => {
  const upstream = await behind429(t, '86400')
  const [one, other] = await Promise.all([upstream.patient('clamp-long@example.com'), upstream.patient('clamp-long-other@example.com')])
  const first = await one()
  t.equal(first.statusCode, 429)
  t.equal(first.json().code, 'UPSTREAM_RATE_LIMITED')
  t.equal(first.headers['retry-after'], '600')
  const next = await other()
  t.equal(next.statusCode, 429)
  t.equal(next.json().code, 'UPSTREAM_RATE_LIMITED')
  const wait = Number(next.headers['retry-after'])
  t.ok(wait >= 599 && wait <= 600, `another patient is told what is left of it: ${String(next.headers['retry-after'])}`)
  t.equal(upstream.calls(), 1, 'no upstream call during the cooldown')
})

t.test('Retry-After: 0 is a one-second cooldown, told as 1, and the upstream is called again after it', async (t) => {
  const upstream = await behind429(t, '0')
  const [one, other] = await Promise.all([upstream.patient('clamp-zero@example.com'), upstream.patient('clamp-zero-other@example.com')])
  const first = await one()
  t.equal(first.statusCode, 429)
  t.equal(first.headers['retry-after'], '1', 'never 0: a client told 0 would retry at once')
  const during = await other()
  t.equal(during.statusCode, 429)
  t.equal(during.headers['retry-after'], '1')
  t.equal(upstream.calls(), 1, 'held back for the second')
  await sleep(1100)
  t.equal((await other()).statusCode, 429)
  t.equal(upstream.calls(), 2, 'called again once the second passed')
})

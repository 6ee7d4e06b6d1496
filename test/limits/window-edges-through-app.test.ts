import t from 'tap'
import { parseList, type Item } from 'structured-headers'
import type { LightMyRequestResponse } from 'fastify'
import { buildTestApp, signIn } from '../helpers/app.js'

/** Each `RateLimit` item by its policy name: `r` and `t`. */
function left (answer: LightMyRequestResponse): Record<string, { r: unknown, t: unknown }> {
  const items: Record<string, { r: unknown, t: unknown }> = {}
  for (const [name, params] of parseList(String(answer.headers.ratelimit)) as Item[]) {
    items[String(name)] = { r: params.get('r'), t: params.get('t') }
  }
  return items
}

// The per-client windows at their edges, through the app on one driven clock (memory stores): the
// request that reaches the limit is served (r=0), the next one in the window is refused with the
// time left of it in whole seconds rounded up, and the first request once the window ended (at
// exactly its length) opens a new one. The session's window starts at its own first hit.
t.test('window edges: the request at the limit is served, the next refused with what is left, the first after the window starts a new one', async (t) => {
  const start = Date.now()
  let now = start
  const { app, issuer } = await buildTestApp(t, { now: () => now, env: { RATE_LIMIT_IP: '4/10s', RATE_LIMIT_SESSION: '2/10s' } })
  const token = await signIn(app, issuer, 'edges@example.com') // the address's first hit, at 0
  const me = async (at: number): Promise<LightMyRequestResponse> => {
    now = start + at
    return await app.inject({ url: '/auth/me', headers: { authorization: `Bearer ${token}` } })
  }

  const first = await me(1000)
  t.equal(first.statusCode, 200)
  t.same(left(first), { ip: { r: 2, t: 9 }, session: { r: 1, t: 10 } })

  const atLimit = await me(9999)
  t.equal(atLimit.statusCode, 200, 'the session\'s last request of its window is served')
  t.same(left(atLimit), { ip: { r: 1, t: 1 }, session: { r: 0, t: 2 } }, '1 ms of the address\'s window left is t=1, not 0')
  t.equal(atLimit.headers['retry-after'], undefined, 'a served answer carries no Retry-After')

  const over = await me(9999)
  t.equal(over.statusCode, 429)
  t.equal(over.json().code, 'RATE_LIMITED')
  t.same(left(over), { ip: { r: 0, t: 1 }, session: { r: 0, t: 2 } }, 'the address reached its limit with this one, the session is over it')
  t.equal(over.headers['retry-after'], '2', 'the session\'s 1001 ms left, rounded up')

  const ipWindowEnded = await me(10_000)
  t.equal(ipWindowEnded.statusCode, 429, 'the session\'s window has not ended yet')
  t.same(left(ipWindowEnded), { ip: { r: 3, t: 10 }, session: { r: 0, t: 1 } }, 'the address\'s new window began at exactly its length')
  t.equal(ipWindowEnded.headers['retry-after'], '1')

  const sessionWindowEnded = await me(11_000)
  t.equal(sessionWindowEnded.statusCode, 200, 'the first request after the session\'s window: served')
  t.same(left(sessionWindowEnded), { ip: { r: 2, t: 9 }, session: { r: 1, t: 10 } })
})

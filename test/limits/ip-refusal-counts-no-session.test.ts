import t from 'tap'
import { parseList, type Item } from 'structured-headers'
import type { LightMyRequestResponse } from 'fastify'
import { buildTestApp, signIn } from '../helpers/app.js'
import { startRedis } from '../helpers/redis.js'

/**
 * README, Rate limits: the limits apply in order (per IP, per session, per cancel), and a request
 * refused by one is not counted by those after it. A session whose requests come from an address
 * over its limit keeps its own quota: from another address, it still has every request the
 * refused ones would have spent.
 */
const redis = await startRedis(t)

function remaining (answer: LightMyRequestResponse): Record<string, unknown> {
  const items: Record<string, unknown> = {}
  for (const [name, params] of parseList(String(answer.headers.ratelimit)) as Item[]) items[String(name)] = params.get('r')
  return items
}

for (const store of ['memory', 'redis'] as const) {
  t.test(`${store}: a request the per-IP limit refuses counts nothing against its session or its cancels`, async (t) => {
    const { app, issuer } = await buildTestApp(t, { ...(store === 'redis' ? { redis } : {}), env: { RATE_LIMIT_IP: '3/1m', RATE_LIMIT_SESSION: '10/1m', RATE_LIMIT_CANCEL: '5/1m' } })
    const token = await signIn(app, issuer, `ip-first-${store}@example.com`) // the address's first request
    const headers = { authorization: `Bearer ${token}` }
    const me = await app.inject({ url: '/auth/me', headers })
    t.same(remaining(me), { ip: 1, session: 9 })
    const cancelUrl = '/appointments/00000000-0000-4000-8000-000000000000/cancel'
    t.same(remaining(await app.inject({ method: 'POST', url: cancelUrl, headers })), { ip: 0, session: 8, cancel: 4 })
    for (let i = 0; i < 4; i++) {
      const refused = await app.inject({ method: 'POST', url: cancelUrl, headers })
      t.equal(refused.statusCode, 429)
      t.equal(refused.json().code, 'RATE_LIMITED')
      t.same(remaining(refused), { ip: 0 }, 'refused by the address: no other policy applied')
    }
    const elsewhere = await app.inject({ method: 'POST', url: cancelUrl, headers, remoteAddress: '192.0.2.77' })
    t.same(remaining(elsewhere), { ip: 2, session: 7, cancel: 3 }, 'from another address: the session and cancel counts as before the refusals, plus this one')
  })
}

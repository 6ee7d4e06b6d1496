import t from 'tap'
import { parseList, type Item } from 'structured-headers'
import { buildTestApp, signIn } from '../helpers/app.js'

/**
 * The other side of retry-after-window.test.ts: a 429's Retry-After is raised only to the end of a
 * window its answer reports spent (r=0, draft-ietf-httpapi-ratelimit-headers-11 section 6). A
 * policy with requests left takes the client's next request at once: raising Retry-After to its
 * window's end would make a client that obeys it wait for nothing (found by a mutation review:
 * noting every window, spent or not, passed every test).
 */
t.test('a per-session 429 whose per-IP policy has requests left keeps the session window\'s Retry-After', async (t) => {
  const start = Date.now()
  const { app, issuer } = await buildTestApp(t, { now: () => start, env: { RATE_LIMIT_IP: '100/1m', RATE_LIMIT_SESSION: '1/10s' } })
  const token = await signIn(app, issuer, 'unspent@example.com')
  const me = { url: '/auth/me', headers: { authorization: `Bearer ${token}` } }
  t.equal((await app.inject(me)).statusCode, 200)
  const refused = await app.inject(me)
  t.equal(refused.statusCode, 429)
  const items = parseList(String(refused.headers.ratelimit)) as Item[]
  const ip = items.find((item) => item[0] === 'ip')
  t.ok(ip !== undefined && (ip[1].get('r') as number) > 0, 'the per-IP policy is reported with requests left')
  t.equal(refused.headers['retry-after'], '10', 'Retry-After is the refusing session window\'s end, not the per-IP window\'s (60 s)')
})

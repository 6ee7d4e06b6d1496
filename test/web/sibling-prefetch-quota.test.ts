import t from 'tap'
import { Browser } from './browser.js'
import { SESSION_COOKIE, startWebStack } from './stack.js'
import { createCsrfCheck } from '../../src/web/csrf.js'

/**
 * A page on a sibling origin needs neither an image nor a fetch to spend its visitor's session
 * quota: speculation rules (`<script type="speculationrules">{"prefetch": [{"source": "list",
 * "urls": [...], "eagerness": "immediate"}]}`) make Chromium prefetch every URL listed, with the
 * SameSite=Strict session cookie (same site), again on every load of the page. Chromium sends
 * such a prefetch as a top-level navigation the browser itself began: `Sec-Fetch-Site: none`,
 * `Sec-Fetch-Mode: navigate`, `Sec-Fetch-Dest: document`, `Sec-Purpose: prefetch` (seen in
 * Debian's Chromium against the demo: 60 URLs prefetched per load, the patient's own app then
 * answered 429). The embed check passes it as the patient's own navigation. A JSON API serves no
 * prefetch (the browser drops a refused one, and a real navigation asks again).
 */

const APP_ORIGIN = 'https://app.example.com'
const PREFETCH = { 'sec-fetch-site': 'none', 'sec-fetch-mode': 'navigate', 'sec-fetch-dest': 'document', 'sec-purpose': 'prefetch' }

t.test('a speculative prefetch spends none of the session\'s quota', async (t) => {
  const stack = await startWebStack(t, { env: { CORS_ORIGINS: APP_ORIGIN, RATE_LIMIT_SESSION: '3/1m', RATE_LIMIT_IP: '1000/1m' } })
  const browser = new Browser()
  await stack.signIn(browser, 'alice@example.com')
  const cookie = stack.sessionOf(browser) as string

  for (const [i, purpose] of ['prefetch', 'prefetch;prerender', 'prefetch;anonymous-client-ip', 'prefetch'].entries()) {
    const answer = await stack.app.inject({ method: 'GET', url: `/auth/me?pf=${i}`, headers: { ...PREFETCH, 'sec-purpose': purpose }, cookies: { [SESSION_COOKIE]: cookie } })
    t.notMatch(String(answer.headers.ratelimit), /"session"/, `Sec-Purpose: ${purpose}: counted against no session limit`)
  }

  const app = { origin: APP_ORIGIN, 'sec-fetch-site': 'same-site', 'sec-fetch-mode': 'cors', 'sec-fetch-dest': 'empty' }
  const me = await stack.app.inject({ method: 'GET', url: '/auth/me', headers: app, cookies: { [SESSION_COOKIE]: cookie } })
  t.equal(me.statusCode, 200, 'the patient\'s own app is not locked out')
  t.match(me.json(), { data: { authenticated: true } })
  t.match(String(me.headers.ratelimit), /"session";r=2;/, 'the first of the session\'s own requests: 2 of 3 left')

  // The patient's own top-level navigation (typed, or a link) is served.
  const typed = await stack.app.inject({ method: 'GET', url: '/auth/me', headers: { 'sec-fetch-site': 'none', 'sec-fetch-mode': 'navigate', 'sec-fetch-dest': 'document', 'sec-fetch-user': '?1' }, cookies: { [SESSION_COOKIE]: cookie } })
  t.equal(typed.statusCode, 200)
})

t.test('createCsrfCheck: Sec-Purpose names a prefetch by its first item\'s token', async (t) => {
  const check = createCsrfCheck(new Set([APP_ORIGIN]))
  const request = (headers: Record<string, string>) => ({ method: 'GET', headers }) as unknown as Parameters<typeof check>[0]
  t.equal(check(request(PREFETCH), 'cookie'), 'prefetch')
  t.equal(check(request({ ...PREFETCH, 'sec-purpose': 'prefetch;prerender' }), 'cookie'), 'prefetch')
  t.equal(check(request(PREFETCH), 'bearer'), null, 'a bearer is never ambient')
  t.equal(check(request({ ...PREFETCH, 'sec-purpose': 'prefetched' }), 'cookie'), null, 'another token')
  t.equal(check(request({ ...PREFETCH, 'sec-purpose': '' }), 'cookie'), null, 'empty')
})

t.test('createCsrfCheck: a prefetch item anywhere in the Sec-Purpose list, as a whole token', async (t) => {
  // A structured-field list (RFC 9651): items split by commas with optional spaces or tabs around them.
  const check = createCsrfCheck(new Set([APP_ORIGIN]))
  const request = (headers: Record<string, string>) => ({ method: 'GET', headers }) as unknown as Parameters<typeof check>[0]
  for (const purpose of ['prerender, prefetch', 'x,prefetch;anonymous-client-ip', 'x, \tprefetch', 'prefetch, x', 'prefetch,x', 'prefetch \t, x']) {
    t.equal(check(request({ ...PREFETCH, 'sec-purpose': purpose }), 'cookie'), 'prefetch', JSON.stringify(purpose))
  }
  for (const purpose of ['x-prefetch', 'prefetch-x', 'a, prefetched', 'aprefetch, b']) {
    t.equal(check(request({ ...PREFETCH, 'sec-purpose': purpose }), 'cookie'), null, JSON.stringify(purpose))
  }
})

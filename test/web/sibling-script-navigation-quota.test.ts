import t from 'tap'
import { Browser } from './browser.js'
import { SESSION_COOKIE, startWebStack } from './stack.js'
import { createCsrfCheck } from '../../src/web/csrf.js'

/**
 * The embed, origin and prefetch checks (web/csrf.ts) leave a sibling subdomain's page one more
 * way to spend its visitor's session quota: navigations. A page that has opened a window once (on
 * any click: `w = window.open(url)`) can navigate it again and again from script
 * (`w.location.href = 'https://api.example.com/appointments?' + i`). Each is a top-level
 * navigation of a document, same-site, with the SameSite=Strict cookie and no `Origin`: seen in
 * Debian's Chromium against the demo (`Sec-Fetch-Site: same-site`, `Sec-Fetch-Mode: navigate`,
 * `Sec-Fetch-Dest: document`, and no `Sec-Fetch-User`, which a browser sends only for a navigation
 * the user made), each counted against the session's limit and sliding its idle expiry. The
 * patient's own navigations (typed: `Sec-Fetch-Site: none`; a link clicked: `Sec-Fetch-User: ?1`)
 * are served as before.
 */

const APP_ORIGIN = 'https://app.example.com'
const SCRIPTED = { 'sec-fetch-site': 'same-site', 'sec-fetch-mode': 'navigate', 'sec-fetch-dest': 'document' }

t.test('a same-site page\'s scripted navigations spend none of its visitor\'s quota', async (t) => {
  const stack = await startWebStack(t, { env: { CORS_ORIGINS: APP_ORIGIN, RATE_LIMIT_SESSION: '3/1m', RATE_LIMIT_IP: '1000/1m' } })
  const browser = new Browser()
  await stack.signIn(browser, 'alice@example.com')
  const cookie = stack.sessionOf(browser) as string

  for (let i = 0; i < 4; i++) {
    const answer = await stack.app.inject({ method: 'GET', url: `/appointments?popup${i}`, headers: SCRIPTED, cookies: { [SESSION_COOKIE]: cookie } })
    t.equal(answer.statusCode, 403, `navigation ${i}: refused`)
    t.notMatch(String(answer.headers.ratelimit), /"session"/, `navigation ${i}: counted against no session limit`)
  }

  const app = { origin: APP_ORIGIN, 'sec-fetch-site': 'same-site', 'sec-fetch-mode': 'cors', 'sec-fetch-dest': 'empty' }
  const me = await stack.app.inject({ method: 'GET', url: '/auth/me', headers: app, cookies: { [SESSION_COOKIE]: cookie } })
  t.equal(me.statusCode, 200, 'the patient\'s own app is not locked out')
  t.match(String(me.headers.ratelimit), /"session";r=2;/, 'the first of the session\'s own requests: 2 of 3 left')

  // The patient's own navigations: a link clicked on the app's page, an address typed.
  const clicked = await stack.app.inject({ method: 'GET', url: '/auth/me', headers: { ...SCRIPTED, 'sec-fetch-user': '?1' }, cookies: { [SESSION_COOKIE]: cookie } })
  t.equal(clicked.statusCode, 200, 'a link the patient clicked')
  t.match(clicked.json(), { data: { authenticated: true } })
  const typed = await stack.app.inject({ method: 'GET', url: '/auth/me', headers: { ...SCRIPTED, 'sec-fetch-site': 'none', 'sec-fetch-user': '?1' }, cookies: { [SESSION_COOKIE]: cookie } })
  t.equal(typed.statusCode, 200, 'an address typed')
})

t.test('createCsrfCheck: a same-site navigation the user did not make is refused', async (t) => {
  const check = createCsrfCheck(new Set([APP_ORIGIN]))
  const request = (method: string, headers: Record<string, string>) => ({ method, headers }) as unknown as Parameters<typeof check>[0]
  t.equal(check(request('GET', SCRIPTED), 'cookie'), 'navigation')
  t.equal(check(request('HEAD', SCRIPTED), 'cookie'), 'navigation', 'HEAD too')
  t.equal(check(request('GET', { ...SCRIPTED, 'sec-fetch-user': '?0' }), 'cookie'), 'navigation', '?0 is no user')
  t.equal(check(request('GET', { ...SCRIPTED, 'sec-fetch-user': '?1' }), 'cookie'), null, 'the user\'s')
  t.equal(check(request('GET', { ...SCRIPTED, 'sec-fetch-site': 'same-origin' }), 'cookie'), null, 'same-origin: our own pages')
  t.equal(check(request('GET', { ...SCRIPTED, 'sec-fetch-site': 'none' }), 'cookie'), null, 'none: the browser\'s own (a reload, a restored tab)')
  t.equal(check(request('GET', SCRIPTED), 'bearer'), null, 'a bearer is never ambient')
  t.equal(check(request('GET', {}), 'cookie'), null, 'a browser without Fetch Metadata')
})

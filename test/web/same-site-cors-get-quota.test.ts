import t from 'tap'
import { Browser } from './browser.js'
import { SESSION_COOKIE, startWebStack } from './stack.js'

/**
 * The embed check (web/csrf.ts) keeps a sibling subdomain's `<img>` and `<iframe>` GETs from
 * spending the patient's per-session quota. The same page needs no embed: a plain
 * `fetch(url, { credentials: 'include' })` GET is a simple CORS request (no preflight), so the
 * browser sends it, with the SameSite=Strict cookie (same site), and only hides the answer from
 * the script (no grant for an origin outside CORS_ORIGINS). The request is still served and
 * counted: a page left open locked its visitor out of the app just the same (429).
 */

const APP_ORIGIN = 'https://app.example.com'
const SIBLING = 'https://user-content.example.com'

t.test('a same-site page\'s credentialed CORS GETs from an origin outside CORS_ORIGINS spend none of its visitor\'s quota', async (t) => {
  const stack = await startWebStack(t, { env: { CORS_ORIGINS: APP_ORIGIN, RATE_LIMIT_SESSION: '3/1m', RATE_LIMIT_IP: '1000/1m' } })
  const browser = new Browser()
  await stack.signIn(browser, 'alice@example.com')
  const cookie = stack.sessionOf(browser) as string

  // What a browser sends for `fetch('https://api.example.com/appointments', { credentials: 'include' })`
  // on the sibling origin's page.
  const sibling = { origin: SIBLING, 'sec-fetch-site': 'same-site', 'sec-fetch-mode': 'cors', 'sec-fetch-dest': 'empty' }
  for (let i = 0; i < 4; i++) {
    const answer = await stack.app.inject({ method: 'GET', url: i % 2 === 0 ? '/appointments' : '/auth/me', headers: sibling, cookies: { [SESSION_COOKIE]: cookie } })
    t.equal(answer.headers['access-control-allow-origin'], undefined, 'the sibling gets no grant (its script cannot read the answer)')
    t.notMatch(String(answer.headers.ratelimit), /"session"/, `request ${i}: counted against no session limit`)
  }

  // The app's own calls, from its allowed origin, have all their quota.
  const app = { origin: APP_ORIGIN, 'sec-fetch-site': 'same-site', 'sec-fetch-mode': 'cors', 'sec-fetch-dest': 'empty' }
  const me = await stack.app.inject({ method: 'GET', url: '/auth/me', headers: app, cookies: { [SESSION_COOKIE]: cookie } })
  t.equal(me.statusCode, 200, 'the patient\'s own app is not locked out')
  t.match(me.json(), { data: { authenticated: true } })
  t.match(String(me.headers.ratelimit), /"session";r=2;/, 'the first of the session\'s own requests: 2 of 3 left')
})

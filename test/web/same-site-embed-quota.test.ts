import t from 'tap'
import { Browser } from './browser.js'
import { SESSION_COOKIE, startWebStack } from './stack.js'
import { createCsrfCheck } from '../../src/web/csrf.js'

/**
 * A page on a sibling origin of the service's site (`user-content.example.com` beside
 * `api.example.com`) cannot forge a cancel: its POSTs lack `X-CSRF: 1` or come from an origin
 * outside CORS_ORIGINS. But the browser sends the SameSite=Strict session cookie with every
 * same-site request, GETs an `<img>` or `<iframe>` makes included. Those requests read nothing
 * (no CORS grant, CORP same-origin, frames denied), yet each spent the patient's per-session quota:
 * a page left open locked its visitor out of their own app (429 on every call) for as long as
 * it kept loading images. The browser says what made them (Fetch Metadata): an embed from
 * another origin, which a cookie-session API never serves.
 */

const APP_ORIGIN = 'https://app.example.com'
const ALICE_APPOINTMENT = '3f0b5d2e-8a41-4c1e-9f27-1a6d3c8e5b01'

t.test('a same-site page\'s images and frames spend none of its visitor\'s session quota', async (t) => {
  const stack = await startWebStack(t, { env: { CORS_ORIGINS: APP_ORIGIN, RATE_LIMIT_SESSION: '3/1m', RATE_LIMIT_IP: '1000/1m' } })
  const browser = new Browser()
  await stack.signIn(browser, 'alice@example.com')
  const cookie = stack.sessionOf(browser) as string

  // What Chrome and Firefox send for `<img src=https://api.example.com/appointments>` and
  // `<iframe src=https://api.example.com/auth/me>` on a sibling origin's page.
  const embeds = [
    { url: '/appointments', headers: { 'sec-fetch-site': 'same-site', 'sec-fetch-mode': 'no-cors', 'sec-fetch-dest': 'image' } },
    { url: '/auth/me', headers: { 'sec-fetch-site': 'same-site', 'sec-fetch-mode': 'navigate', 'sec-fetch-dest': 'iframe' } },
    { url: '/appointments', headers: { 'sec-fetch-site': 'same-site', 'sec-fetch-mode': 'no-cors', 'sec-fetch-dest': 'script' } }
  ]
  for (let round = 0; round < 2; round++) {
    for (const embed of embeds) {
      const answer = await stack.app.inject({ method: 'GET', url: embed.url, headers: embed.headers, cookies: { [SESSION_COOKIE]: cookie } })
      t.not(answer.statusCode, 200, `${embed.headers['sec-fetch-dest']} ${embed.url}: not served`)
      t.notMatch(String(answer.headers.ratelimit), /"session"/, 'counted against no session limit')
    }
  }

  // The app's own calls (CORS fetches from the app's origin, same-site) have all their quota.
  const app = { origin: APP_ORIGIN, 'sec-fetch-site': 'same-site', 'sec-fetch-mode': 'cors', 'sec-fetch-dest': 'empty' }
  const me = await stack.app.inject({ method: 'GET', url: '/auth/me', headers: app, cookies: { [SESSION_COOKIE]: cookie } })
  t.equal(me.statusCode, 200)
  t.match(me.json(), { data: { authenticated: true } })
  t.match(String(me.headers.ratelimit), /"session";r=2;/, 'the first of the session\'s own requests: 2 of 3 left')
  const cancel = await stack.app.inject({ method: 'POST', url: `/appointments/${ALICE_APPOINTMENT}/cancel`, headers: { ...app, 'x-csrf': '1' }, cookies: { [SESSION_COOKIE]: cookie } })
  t.not(cancel.statusCode, 429, `the patient's own cancel is not refused for a quota others spent: ${cancel.statusCode}`)

  // Same-origin requests, top-level navigations the patient made (a link clicked: Sec-Fetch-User)
  // and requests from browsers without Fetch Metadata are served as before.
  const served = [
    { 'sec-fetch-site': 'same-origin', 'sec-fetch-mode': 'no-cors', 'sec-fetch-dest': 'image' },
    { 'sec-fetch-site': 'same-site', 'sec-fetch-mode': 'navigate', 'sec-fetch-dest': 'document', 'sec-fetch-user': '?1' },
    { 'sec-fetch-site': 'none', 'sec-fetch-mode': 'navigate', 'sec-fetch-dest': 'document' },
    {}
  ]
  for (const headers of served) {
    const fresh = new Browser()
    await stack.signIn(fresh, 'bob@example.com')
    const answer = await stack.app.inject({ method: 'GET', url: '/auth/me', headers, cookies: { [SESSION_COOKIE]: stack.sessionOf(fresh) as string } })
    t.equal(answer.statusCode, 200, `served: ${JSON.stringify(headers)}`)
    t.match(answer.json(), { data: { authenticated: true } })
  }
})

t.test('createCsrfCheck: a safe request with the cookie is refused only when another origin\'s page embedded it', async (t) => {
  const check = createCsrfCheck(new Set([APP_ORIGIN]))
  const request = (method: string, headers: Record<string, string>) => ({ method, headers }) as unknown as Parameters<typeof check>[0]
  const embedded = { 'sec-fetch-site': 'cross-site', 'sec-fetch-mode': 'no-cors', 'sec-fetch-dest': 'image' }
  t.equal(check(request('GET', embedded), 'cookie'), 'embedded', 'cross-site no-cors')
  t.equal(check(request('HEAD', { ...embedded, 'sec-fetch-site': 'same-site' }), 'cookie'), 'embedded', 'HEAD too')
  t.equal(check(request('GET', embedded), 'bearer'), null, 'a bearer is never ambient')
  t.equal(check(request('GET', { 'sec-fetch-site': 'same-site', 'sec-fetch-mode': 'cors', 'sec-fetch-dest': 'empty', origin: APP_ORIGIN }), 'cookie'), null, 'the app\'s CORS fetch')
  t.equal(check(request('GET', { 'sec-fetch-site': 'same-site', 'sec-fetch-mode': 'navigate', 'sec-fetch-dest': 'frame' }), 'cookie'), 'embedded', 'a frame')
})

import t from 'tap'
import { Browser } from './browser.js'
import { SESSION_COOKIE, startWebStack } from './stack.js'

/**
 * The CSRF check is for the session a request acts in. On a route whose session is optional
 * (GET /auth/me), a cookie that names no session (stale, or never issued) leaves the request
 * without one: it is answered as any request without a session, whatever page sent it, and no
 * ambient credential is used. A live cookie sent the same way is refused.
 */

const APP_ORIGIN = 'https://app.example.com'

t.test('a dead session cookie on an optional-session route is not CSRF-checked; a live one is', async (t) => {
  const stack = await startWebStack(t, { env: { CORS_ORIGINS: APP_ORIGIN } })
  const foreign = { origin: 'https://evil.example' }

  const dead = await stack.app.inject({ method: 'GET', url: '/auth/me', headers: foreign, cookies: { [SESSION_COOKIE]: 'A'.repeat(43) } })
  t.equal(dead.statusCode, 200, 'no session: answered as such')
  t.match(dead.json(), { data: { authenticated: false } })

  const browser = new Browser()
  await stack.signIn(browser, 'alice@example.com')
  const live = await stack.app.inject({ method: 'GET', url: '/auth/me', headers: foreign, cookies: { [SESSION_COOKIE]: stack.sessionOf(browser) as string } })
  t.equal(live.statusCode, 403, 'the control: a live session fetched by a foreign page is refused')
  t.match(live.json(), { code: 'CSRF_REJECTED' })
})

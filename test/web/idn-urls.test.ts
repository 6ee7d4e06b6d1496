import t from 'tap'
import { Browser } from './browser.js'
import { SESSION_COOKIE, startWebStack } from './stack.js'

/**
 * PUBLIC_URL and WEB_APP_URL with an internationalized host name. Config takes them as URLs (and
 * puts their origins, in the ASCII form browsers send, among the CORS origins), but the sign-in
 * used their text as typed: a Location header or an OAuth parameter must carry the host as a URL
 * carries it (RFC 3986 host: the A-label, `xn--...`), or the browser is sent nowhere and the
 * identity provider compares another string with the URI registered there.
 */

const WEB_APP = 'https://例え.jp/app'
const WEB_APP_ASCII = 'https://xn--r8jz45g.jp/app'

t.test('WEB_APP_URL with an IDN host: sign-in and its failures end on the web app, in ASCII', async (t) => {
  const stack = await startWebStack(t, { env: { WEB_APP_URL: WEB_APP } })
  const browser = new Browser()
  const callback = await stack.callbackUrl(browser, 'alice@example.com', '/appointments?tab=upcoming')
  const done = await browser.fetch(callback)
  t.equal(done.status, 302)
  t.equal(done.headers.get('location'), `${WEB_APP_ASCII}/appointments?tab=upcoming`, 'to returnTo on the web app')
  const cookie = stack.sessionOf(browser)
  t.ok(cookie, 'the session cookie is set')
  const me = await stack.app.inject({ method: 'GET', url: '/auth/me', cookies: { [SESSION_COOKIE]: cookie ?? '' } })
  t.match(me.json(), { data: { authenticated: true, email: 'alice@example.com' } })

  const forged = await new Browser().fetch(`${stack.publicUrl}/auth/callback?state=forged&code=x`)
  t.equal(forged.status, 302)
  t.equal(forged.headers.get('location'), `${WEB_APP_ASCII}/?signin_error=login_expired`, 'a failure goes to the web app too')

  // A sign-out whose session has ended names the IdP's end-session URL, returning to the web app.
  if (cookie !== undefined) await stack.app.sessions.revoke(cookie)
  const logout = await browser.fetch(`${stack.publicUrl}/auth/logout`, { method: 'POST', headers: { 'x-csrf': '1' } })
  t.equal(logout.status, 401)
  const body = (await logout.json()) as { data?: { endSessionUrl?: string } }
  const endSessionUrl = new URL(body.data?.endSessionUrl ?? 'about:blank')
  t.equal(endSessionUrl.searchParams.get('post_logout_redirect_uri'), WEB_APP_ASCII, 'the registered post-logout redirect URI')
})

t.test('PUBLIC_URL with an IDN host: the redirect URI sent to the identity provider is in ASCII', async (t) => {
  const stack = await startWebStack(t, { env: { PUBLIC_URL: 'https://bücher.example/bff' } })
  const login = await stack.app.inject({ method: 'GET', url: '/auth/login' })
  t.equal(login.statusCode, 302)
  const authorization = new URL(login.headers.location as string)
  t.equal(authorization.origin, stack.idp.url, 'to the identity provider')
  t.equal(authorization.searchParams.get('redirect_uri'), 'https://xn--bcher-kva.example/bff/auth/callback')
})

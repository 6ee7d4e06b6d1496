import t from 'tap'
import { randomUUID } from 'node:crypto'
import { SignJWT, importJWK, type JWK } from 'jose'
import { buildTestApp } from '../helpers/app.js'
import { startTestIdp } from '../helpers/idp.js'
import { freePort } from '../helpers/ports.js'
import { SANDBOX_KEY, startSandbox } from '../helpers/sandbox.js'
import { Browser } from '../web/browser.js'
import { LOGIN_COOKIE_PREFIX, SESSION_COOKIE } from '../web/stack.js'
import { captureLogs, scanLogs } from '../fault/support.js'

// The secret classes of the cookie (web) flow, which no log scan of the suite sees today (every
// scan drives the mobile flow; test/web/* runs with LOG_LEVEL=silent): the session cookie, the
// login-state cookie, the authorization code and state, the web client secret, the ID token kept
// for the end-session hint, a logout token, the email and the reason.
t.test('the web flow logs no cookie, code, state, client secret, ID token, logout token, email or reason', async (t) => {
  const { lines, stream } = captureLogs()
  const port = await freePort()
  const publicUrl = `http://127.0.0.1:${port}`
  const idp = await startTestIdp(t, { publicUrl })
  const sandbox = await startSandbox(t)
  const { app } = await buildTestApp(t, {
    upstreamUrl: sandbox.url,
    logStream: stream,
    env: { CV_API_KEY: SANDBOX_KEY, OIDC_ISSUER: idp.url, OIDC_CLIENT_ID: idp.clientId, OIDC_CLIENT_SECRET: idp.clientSecret, PUBLIC_URL: publicUrl, LOG_LEVEL: 'debug' }
  })
  await app.listen({ host: '127.0.0.1', port })
  const email = 'alice@example.com'
  const reason = 'Private web reason: feeling better'

  // Sign in at the IdP, stopping at the callback to read its code and state.
  const browser = new Browser()
  let url = `${publicUrl}/auth/login?returnTo=%2F`
  let init: Parameters<Browser['fetch']>[1] = {}
  let callback: string | null = null
  for (let hops = 0; hops < 10 && callback === null; hops++) {
    const response = await browser.fetch(url, init)
    init = {}
    const location = response.headers.get('location')
    if (location === null) {
      init = { method: 'POST', form: { account: email } }
      continue
    }
    url = new URL(location, url).href
    if (url.startsWith(`${publicUrl}/auth/callback`)) callback = url
  }
  t.ok(callback, 'reached the callback')
  const params = new URL(callback as string).searchParams
  const code = params.get('code') as string
  const state = params.get('state') as string
  const loginCookies = browser.cookieNames(publicUrl, LOGIN_COOKIE_PREFIX).map((name) => browser.cookie(publicUrl, name) as string)
  t.ok([302, 303].includes((await browser.fetch(callback as string)).status), 'the callback redirects')
  const cookie = browser.cookie(publicUrl, SESSION_COOKIE) as string
  t.ok(cookie, 'a session cookie')
  // The same callback again: a refused code (a logged failure).
  t.ok([302, 303].includes((await new Browser().fetch(callback as string)).status), 'a replayed callback is refused by redirect')

  const cancel = await browser.fetch(`${publicUrl}/appointments/3f0b5d2e-8a41-4c1e-9f27-1a6d3c8e5b01/cancel`, { method: 'POST', headers: { 'x-csrf': '1' }, json: { reason } })
  t.equal(cancel.status, 200, 'a cookie cancel')
  t.equal((await browser.fetch(`${publicUrl}/appointments/3f0b5d2e-8a41-4c1e-9f27-1a6d3c8e5b01/cancel`, { method: 'POST', json: { reason } })).status, 403, 'one without X-CSRF')

  // The IdP ends the session by a back-channel logout token.
  const key = await importJWK(idp.signingKeys[0] as JWK, 'RS256')
  const iat = Math.floor(Date.now() / 1000)
  const logoutToken = await new SignJWT({ iss: idp.url, aud: idp.clientId, iat, exp: iat + 120, jti: randomUUID(), sub: 'unknown-subject', events: { 'http://schemas.openid.net/event/backchannel-logout': {} } })
    .setProtectedHeader({ alg: 'RS256', kid: idp.signingKeys[0]?.kid as string, typ: 'logout+jwt' }).sign(key)
  t.equal((await fetch(`${publicUrl}/auth/backchannel-logout`, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: new URLSearchParams({ logout_token: logoutToken }) })).status, 200)
  t.equal((await browser.fetch(`${publicUrl}/auth/logout`, { method: 'POST', headers: { 'x-csrf': '1' } })).status, 200, 'signed out')

  await new Promise((resolve) => setTimeout(resolve, 100))
  scanLogs(t, lines, {
    'API key': SANDBOX_KEY,
    'session cookie': cookie,
    'login-state cookie': loginCookies,
    'authorization code': code,
    state,
    'web client secret': idp.clientSecret,
    'logout token': [logoutToken, logoutToken.split('.')[2] as string],
    email,
    reason
  })
})

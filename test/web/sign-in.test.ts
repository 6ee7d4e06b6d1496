import t from 'tap'
import { once } from 'node:events'
import { connect as connectTo, createServer, type Socket } from 'node:net'
import { Browser } from './browser.js'
import { LOGIN_COOKIE_PREFIX, loginCookieFor, loginCookieName, SESSION_COOKIE, startWebStack, type WebStack } from './stack.js'
import { buildTestApp, signIn as mobileSignIn } from '../helpers/app.js'
import { createLoginStateSeal } from '../../src/web/login-state.js'
import { decodeJwt, decodeProtectedHeader, generateKeyPair, SignJWT } from 'jose'

/**
 * Web sign-in end to end: a browser-style client (cookie jar, redirects followed by hand) against
 * the service listening on loopback and a real OpenID Provider, with each session store.
 */

const ALICE_APPOINTMENT = '3f0b5d2e-8a41-4c1e-9f27-1a6d3c8e5b01'

async function me (stack: WebStack, cookie: string | undefined) {
  const response = await stack.app.inject({
    method: 'GET',
    url: '/auth/me',
    ...(cookie === undefined ? {} : { cookies: { [SESSION_COOKIE]: cookie } })
  })
  return (response.json() as { data: { authenticated: boolean, email?: string } }).data
}

function signinError (url: string): string | null {
  return new URL(url).searchParams.get('signin_error')
}

for (const store of ['memory', 'redis'] as const) {
  t.test(`${store} store`, async (t) => {
    const stack = await startWebStack(t, { sandbox: true, redis: store === 'redis' })
    const { publicUrl, idp } = stack

    t.test('signs in, lists and cancels its own appointment with the cookie, signs out', async (t) => {
      const browser = new Browser()
      const page = await stack.signIn(browser, 'alice@example.com', '/appointments?tab=upcoming')
      t.equal(page.url, `${publicUrl}/appointments?tab=upcoming`, 'lands on returnTo, on our origin')

      const loginSet = browser.received.find((entry) => entry.url.includes('/auth/login') && entry.line.startsWith(LOGIN_COOKIE_PREFIX))
      t.ok(loginSet, 'login state in a cookie')
      t.match(loginSet?.line, /; Max-Age=600;/)
      t.match(loginSet?.line, /; Path=\//)
      t.match(loginSet?.line, /; HttpOnly/)
      t.match(loginSet?.line, /; Secure/)
      t.match(loginSet?.line, /; SameSite=Lax/)

      const callbackSets = browser.received.filter((entry) => entry.url.startsWith(`${publicUrl}/auth/callback`))
      const sessionSet = callbackSets.find((entry) => entry.line.startsWith(`${SESSION_COOKIE}=`))?.line ?? ''
      t.match(sessionSet, new RegExp(`^${SESSION_COOKIE}=[A-Za-z0-9_-]{43}; `), 'opaque session id only')
      for (const attribute of ['Path=/', 'HttpOnly', 'Secure', 'SameSite=Strict']) t.ok(sessionSet.split('; ').includes(attribute), attribute)
      t.notMatch(sessionSet, /Domain|Max-Age|Expires/i, 'no Domain, a browser-session cookie')
      t.ok(callbackSets.some((entry) => entry.line.startsWith(`${loginSet?.line.split('=')[0] as string}=;`)), 'login state cleared by the callback')
      t.same(browser.cookieNames(publicUrl, LOGIN_COOKIE_PREFIX), [])

      const cookie = stack.sessionOf(browser)
      t.match(await me(stack, cookie), { authenticated: true, email: 'alice@example.com' })

      const listed = await browser.fetch(`${publicUrl}/appointments`)
      t.equal(listed.status, 200)
      t.ok(((await listed.json()) as { data: Array<{ id: string }> }).data.some((item) => item.id === ALICE_APPOINTMENT))

      const cancelUrl = `${publicUrl}/appointments/${ALICE_APPOINTMENT}/cancel`
      const callsBefore = stack.sandbox?.control.calls.length ?? 0
      const forged = await browser.fetch(cancelUrl, { method: 'POST', json: { reason: 'forged' } })
      t.equal(forged.status, 403, 'no X-CSRF: refused')
      t.equal(((await forged.json()) as { code: string }).code, 'CSRF_REJECTED')
      t.equal(stack.sandbox?.control.calls.length, callsBefore, 'and no upstream call')

      const cancelled = await browser.fetch(cancelUrl, { method: 'POST', headers: { 'x-csrf': '1', origin: publicUrl, 'sec-fetch-site': 'same-origin' }, json: { reason: 'Feeling better' } })
      t.equal(cancelled.status, 200, await cancelled.clone().text())
      t.ok(stack.sandbox?.control.isCancelled(ALICE_APPOINTMENT))

      const noCsrfLogout = await browser.fetch(`${publicUrl}/auth/logout`, { method: 'POST' })
      t.equal(noCsrfLogout.status, 403, 'sign-out needs X-CSRF too')
      const logout = await browser.fetch(`${publicUrl}/auth/logout`, { method: 'POST', headers: { 'x-csrf': '1' } })
      t.equal(logout.status, 200)
      t.ok(logout.headers.getSetCookie().some((line) => line.startsWith(`${SESSION_COOKIE}=;`) && line.includes('Path=/') && line.includes('Secure')), 'cookie cleared')
      t.equal(stack.sessionOf(browser), undefined)
      t.same(await me(stack, cookie), { authenticated: false }, 'the old id is dead')

      const endSessionUrl = new URL(((await logout.json()) as { data: { endSessionUrl: string } }).data.endSessionUrl)
      t.equal(endSessionUrl.origin, idp.url)
      t.equal(endSessionUrl.searchParams.get('client_id'), idp.clientId)
      t.equal(endSessionUrl.searchParams.get('post_logout_redirect_uri'), publicUrl)
      t.ok(endSessionUrl.searchParams.get('id_token_hint'))
      // That hint is the web session's ID token, now in the browser's history and the IdP's logs.
      // Its audience is one POST /auth/session accepts (OIDC_AUDIENCES defaults to the web
      // client), and it is still young: it must not become a new session after the sign-out.
      const exchanged = await stack.app.inject({ method: 'POST', url: '/auth/session', payload: { idToken: endSessionUrl.searchParams.get('id_token_hint') } })
      t.equal(exchanged.statusCode, 401, 'the web sign-in\'s ID token is no credential for POST /auth/session')
      t.equal((exchanged.json() as { code: string }).code, 'SESSION_REQUIRED')

      // The browser goes on to end the IdP session and comes back to the app.
      const confirm = await browser.navigate(endSessionUrl.href)
      t.equal(confirm.status, 200)
      const xsrf = /name="xsrf" value="([^"]+)"/.exec(confirm.text)?.[1] as string
      const action = /action="([^"]+)"/.exec(confirm.text)?.[1] as string
      const back = await browser.navigate(new URL(action, idp.url).href, { method: 'POST', form: { xsrf, logout: 'yes' } })
      t.ok(back.url.startsWith(publicUrl), 'back at PUBLIC_URL')
      t.equal(idp.backchannel.delivered, 1, 'the IdP told us over the back channel too (no session left to end)')
    })

    t.test('HEAD changes nothing: the sign-in routes do not answer it, and the code stays the browser\'s', async (t) => {
      const browser = new Browser()
      const login = await browser.fetch(`${publicUrl}/auth/login?returnTo=%2F`, { method: 'HEAD' })
      t.equal(login.status, 404)
      t.same(login.headers.getSetCookie(), [], 'no login state minted')
      const callback = await stack.callbackUrl(browser, 'alice@example.com')
      const scanned = await browser.fetch(callback, { method: 'HEAD' })
      t.equal(scanned.status, 404, 'a link scanner\'s HEAD')
      t.same(scanned.headers.getSetCookie(), [], 'no session, no cookie cleared')
      const page = await browser.navigate(callback)
      t.equal(page.url, `${publicUrl}/`, 'the browser\'s GET still signs in')
      t.match(await me(stack, stack.sessionOf(browser)), { authenticated: true, email: 'alice@example.com' })
    })

    t.test('signing out after the session has ended: 401, the cookie cleared, and the IdP\'s end-session URL all the same', async (t) => {
      const browser = new Browser()
      await stack.signIn(browser, 'alice@example.com')
      // Ended meanwhile (idle, absolute, or elsewhere): the patient still means to sign out.
      await stack.app.sessions.revoke(stack.sessionOf(browser) as string)
      const logout = await browser.fetch(`${publicUrl}/auth/logout`, { method: 'POST', headers: { 'x-csrf': '1' } })
      t.equal(logout.status, 401)
      const body = (await logout.json()) as { code: string, data?: { endSessionUrl: string } }
      t.equal(body.code, 'SESSION_REQUIRED')
      t.equal(stack.sessionOf(browser), undefined, 'the dead cookie is cleared')
      const endSessionUrl = new URL(body.data?.endSessionUrl as string)
      t.equal(endSessionUrl.origin, idp.url, 'so that the next patient on this device does not sign in through this one\'s IdP session')
      t.equal(endSessionUrl.searchParams.get('client_id'), idp.clientId)
      t.equal(endSessionUrl.searchParams.get('id_token_hint'), null, 'no ID token: the session and its token are gone')
      // A bearer that names no session: the mobile app's 401, nothing more.
      const bearer = await stack.app.inject({ method: 'POST', url: '/auth/logout', headers: { authorization: `Bearer ${'A'.repeat(43)}` } })
      t.equal(bearer.statusCode, 401)
      t.equal((bearer.json() as { data?: unknown }).data, undefined)
      t.equal(bearer.headers['set-cookie'], undefined)
    })

    t.test('mobile sessions: bearer sign-out clears no cookie, and names the bare end-session endpoint (no web ID token in it)', async (t) => {
      const token = await stack.bearerFor('alice@example.com')
      const logout = await stack.app.inject({ method: 'POST', url: '/auth/logout', headers: { authorization: `Bearer ${token}` } })
      t.equal(logout.statusCode, 200)
      const url = new URL((logout.json() as { data: { endSessionUrl: string } }).data.endSessionUrl)
      t.equal(url.origin, stack.idp.url, "the provider's own endpoint")
      t.equal(url.search, '', 'the app adds its client_id, id_token_hint and post_logout_redirect_uri')
      t.equal(logout.headers['set-cookie'], undefined)
    })

    t.test('a sign-in ends the session the browser had at /auth/login, though its SameSite=Strict cookie stays off the IdP\'s redirect', async (t) => {
      const browser = new Browser()
      await stack.signIn(browser, 'alice@example.com')
      const before = stack.sessionOf(browser) as string
      // Signed out at the IdP only, so that it asks again (and the flow stops at its login page).
      browser.jar.delete(new URL(idp.url).origin)
      // /auth/login: a same-site navigation from the web app, which carries the session cookie.
      const callback = await stack.callbackUrl(browser, 'alice@example.com')
      // The identity provider's redirect back is cross-site where the IdP is another site (the
      // demo's is): the browser sends no Strict cookie with it.
      browser.jar.get(new URL(publicUrl).origin)?.delete(SESSION_COOKIE)
      const page = await browser.navigate(callback)
      t.equal(signinError(page.url), null)
      const after = stack.sessionOf(browser)
      t.not(after, before)
      t.equal((await me(stack, after)).email, 'alice@example.com')
      t.same(await me(stack, before), { authenticated: false }, 'the earlier session is ended')
    })

    t.test('session fixation: a cookie from before sign-in is never adopted', async (t) => {
      const attacker = new Browser()
      await stack.signIn(attacker, 'bob@example.com')
      const planted = stack.sessionOf(attacker) as string
      t.match(await me(stack, planted), { authenticated: true, email: 'bob@example.com' })

      const victim = new Browser()
      victim.setCookie(publicUrl, SESSION_COOKIE, planted)
      await stack.signIn(victim, 'alice@example.com')
      const issued = stack.sessionOf(victim)
      t.not(issued, planted, 'a new id')
      t.equal((await me(stack, issued)).email, 'alice@example.com')
      t.same(await me(stack, planted), { authenticated: false }, 'the planted session is ended')

      const unknown = new Browser()
      const forged = 'A'.repeat(42) + 'A'
      unknown.setCookie(publicUrl, SESSION_COOKIE, forged)
      await stack.signIn(unknown, 'alice@example.com')
      t.not(stack.sessionOf(unknown), forged)
      t.same(await me(stack, forged), { authenticated: false })

      const junk = new Browser()
      junk.setCookie(publicUrl, SESSION_COOKIE, 'not-a-token')
      await stack.signIn(junk, 'alice@example.com')
      t.equal((await me(stack, stack.sessionOf(junk))).email, 'alice@example.com')
    })

    t.test('session fixation: a cookie that comes to the callback only is ended too', async (t) => {
      // Kills dropping the revoke of the callback's own session cookie (routes.ts): the test above
      // has the planted cookie at /auth/login too, where the sealed previousSession ends it.
      const attacker = new Browser()
      await stack.signIn(attacker, 'bob@example.com')
      const planted = stack.sessionOf(attacker) as string
      const victim = new Browser()
      const callback = await stack.callbackUrl(victim, 'alice@example.com')
      victim.setCookie(publicUrl, SESSION_COOKIE, planted)
      const page = await victim.navigate(callback)
      t.equal(signinError(page.url), null)
      t.not(stack.sessionOf(victim), planted, 'a new id')
      t.equal((await me(stack, stack.sessionOf(victim))).email, 'alice@example.com')
      t.same(await me(stack, planted), { authenticated: false }, 'the session the callback brought is ended')
    })

    t.test('open redirects: returnTo never leaves this service', async (t) => {
      const attacks = ['//evil.com', '/\\evil.com', 'https://evil.com', '/%2F%2Fevil.com', '\t//evil', '/\t/evil.com', 'javascript:alert(1)']
      for (const returnTo of attacks) {
        const browser = new Browser()
        const page = await stack.signIn(browser, 'carol@example.com', returnTo)
        t.equal(page.url, `${publicUrl}/`, `${JSON.stringify(returnTo)} → /`)
        t.ok(stack.sessionOf(browser), 'signed in all the same')
      }
      const browser = new Browser()
      const twice = await browser.fetch(`${publicUrl}/auth/login?returnTo=/a&returnTo=//evil.com`)
      t.equal(twice.status, 302)
      const loginPage = await browser.navigate(twice.headers.get('location') as string)
      const landed = await browser.navigate(loginPage.url, { method: 'POST', form: { account: 'carol@example.com' } })
      t.equal(landed.url, `${publicUrl}/`, 'a repeated returnTo falls back to /')
    })

    t.test('a returnTo outside ASCII: the redirect after sign-in carries it percent-encoded', async (t) => {
      const browser = new Browser()
      const page = await stack.signIn(browser, 'carol@example.com', '/café?q=€')
      t.equal(page.url, `${publicUrl}/caf%C3%A9?q=%E2%82%AC`, 'a 302 a browser can follow, not a 500')
      t.ok(stack.sessionOf(browser), 'signed in, with the cookie')
    })

    t.test('denied consent: no session, the app learns why', async (t) => {
      const browser = new Browser()
      const loginPage = await browser.navigate(`${publicUrl}/auth/login?returnTo=/x`)
      const page = await browser.navigate(loginPage.url, { method: 'POST', form: { deny: '1' } })
      t.equal(page.url, `${publicUrl}/?signin_error=access_denied`)
      t.equal(stack.sessionOf(browser), undefined)
      t.same(browser.cookieNames(publicUrl, LOGIN_COOKIE_PREFIX), [], 'login state cleared')
    })

    t.test('an unverified email gets no session', async (t) => {
      const browser = new Browser()
      const page = await stack.signIn(browser, 'unverified@example.com')
      t.equal(signinError(page.url), 'email_unverified')
      t.equal(stack.sessionOf(browser), undefined)
    })

    t.test('sign-ins begun in two tabs: each finishes, in either order', async (t) => {
      const browser = new Browser()
      const first = await stack.callbackUrl(browser, 'alice@example.com', '/first')
      const second = await stack.callbackUrl(browser, 'alice@example.com', '/second')
      t.equal(browser.cookieNames(publicUrl, LOGIN_COOKIE_PREFIX).length, 2, 'one login state per sign-in')
      t.equal((await browser.navigate(second)).url, `${publicUrl}/second`, 'the later one')
      t.same(browser.cookieNames(publicUrl, LOGIN_COOKIE_PREFIX), [loginCookieFor(first)], 'which cleared its own login state only')
      t.equal((await browser.navigate(first)).url, `${publicUrl}/first`, 'then the earlier one')
      t.ok(stack.sessionOf(browser))
      t.same(browser.cookieNames(publicUrl, LOGIN_COOKIE_PREFIX), [])
    })

    t.test('a callback for none of the sign-ins under way in this browser: state_mismatch, and theirs go on', async (t) => {
      const browser = new Browser()
      const mine = await stack.callbackUrl(browser, 'alice@example.com')
      const foreign = await stack.callbackUrl(new Browser(), 'alice@example.com')
      t.equal(signinError((await browser.navigate(foreign)).url), 'state_mismatch')
      // Nor does an IdP error for another sign-in (a forged link) end this one, nor pass for the IdP's.
      t.equal(signinError((await browser.navigate(`${publicUrl}/auth/callback?error=access_denied&state=forged`)).url), 'state_mismatch')
      t.equal((await browser.navigate(mine)).url, `${publicUrl}/`, 'the sign-in under way still finishes')
      t.ok(stack.sessionOf(browser))
      // A sealed login state under another sign-in's name.
      const again = await stack.callbackUrl(browser, 'alice@example.com')
      const other = await stack.callbackUrl(browser, 'alice@example.com')
      browser.setCookie(publicUrl, loginCookieFor(again), browser.cookie(publicUrl, loginCookieFor(other)) as string)
      t.equal(signinError((await browser.navigate(again)).url), 'state_mismatch')
    })

    t.test('login cookies are those the service names: others are left alone, and only a few are read', async (t) => {
      const ours = Array.from({ length: 300 }, (_, i) => `${loginCookieName(String(i))}=x`)
      // A name one character too long among the last few (the ones read), where an unreadable
      // login cookie of ours would be cleared.
      ours.splice(-3, 0, `__Host-bff-login-${'x'.repeat(17)}=x`)
      const cookie = ['__Host-bff-login-a b=x', '__Host-bff-login-é=x', '__Host-bff-login-short=x', ...ours].join('; ')
      const answer = await stack.app.inject({ method: 'GET', url: '/auth/login', headers: { cookie } })
      t.equal(answer.statusCode, 302, 'not a 500 for a name that cannot be written back')
      t.ok(String(answer.headers.location).startsWith(idp.url), 'on to the IdP')
      const cleared = ([] as string[]).concat(answer.headers['set-cookie'] ?? []).filter((line) => /^[^=]+=;/.test(line))
      t.ok(cleared.length > 0 && cleared.length <= 6, `a few of the unreadable ones cleared (${cleared.length})`)
      t.notOk(cleared.some((line) => /^__Host-bff-login-(a b|é|short|x{17})=/.test(line)), 'names of no sign-in of ours are left alone')
    })

    t.test('a browser keeps a few sign-ins under way: a new one ends the oldest', async (t) => {
      const browser = new Browser()
      const urls: string[] = []
      for (let i = 0; i < 4; i++) urls.push(await stack.callbackUrl(browser, 'alice@example.com', `/tab${i}`))
      browser.setCookie(publicUrl, loginCookieName('unreadable'), 'not-a-sealed-state')
      urls.push(await stack.callbackUrl(browser, 'alice@example.com', '/tab4'))
      t.same(browser.cookieNames(publicUrl, LOGIN_COOKIE_PREFIX).sort(), urls.slice(2).map(loginCookieFor).sort(), 'the three latest, the unreadable one gone')
      t.equal(signinError((await browser.navigate(urls[0] as string)).url), 'state_mismatch', 'the oldest ended')
      t.equal((await browser.navigate(urls[4] as string)).url, `${publicUrl}/tab4`)
    })

    t.test('a callback URL replayed in another browser (login CSRF): login_expired', async (t) => {
      const victim = new Browser()
      const url = await stack.callbackUrl(new Browser(), 'bob@example.com')
      const page = await victim.navigate(url)
      t.equal(signinError(page.url), 'login_expired')
      t.equal(stack.sessionOf(victim), undefined)
    })

    t.test('a replayed authorization code: exchange_failed', async (t) => {
      const browser = new Browser()
      const url = await stack.callbackUrl(browser, 'alice@example.com')
      const loginState = browser.cookie(publicUrl, loginCookieFor(url)) as string
      t.equal((await browser.navigate(url)).url, `${publicUrl}/`)
      const thief = new Browser()
      thief.setCookie(publicUrl, loginCookieFor(url), loginState)
      const page = await thief.navigate(url)
      t.equal(signinError(page.url), 'exchange_failed')
      t.equal(stack.sessionOf(thief), undefined)
    })

    t.test('other IdP errors and a forged login state', async (t) => {
      const browser = new Browser()
      // An error of anyone's choosing, with no sign-in of this browser's: no IdP's answer.
      t.equal(signinError((await browser.navigate(`${publicUrl}/auth/callback?error=access_denied`)).url), 'login_expired')
      const state = new URL(await stack.callbackUrl(browser, 'alice@example.com')).searchParams.get('state') as string
      const failed = await browser.navigate(`${publicUrl}/auth/callback?error=server_error&error_description=%3Cscript%3E&state=${state}&iss=${encodeURIComponent(idp.url)}`)
      t.equal(signinError(failed.url), 'idp_error', 'the IdP\'s own error, for this browser\'s sign-in')
      t.equal(stack.sessionOf(browser), undefined)
      t.same(browser.cookieNames(publicUrl, LOGIN_COOKIE_PREFIX), [], 'its login state cleared')
      browser.setCookie(publicUrl, loginCookieName('y'), 'eyJhbGciOiJkaXIiLCJlbmMiOiJBMjU2R0NNIn0..forged.forged.forged')
      t.equal(signinError((await browser.navigate(`${publicUrl}/auth/callback?code=x&state=y`)).url), 'login_expired')
      t.equal(signinError((await browser.navigate(`${publicUrl}/auth/callback`)).url), 'login_expired')
    })

    t.test('an unknown code: exchange_failed; an ID token for another nonce: invalid_token', async (t) => {
      const browser = new Browser()
      const url = await stack.callbackUrl(browser, 'alice@example.com')
      const loginState = browser.cookie(publicUrl, loginCookieFor(url)) as string
      const page = await browser.navigate(url.replace(/([?&])code=[^&]+/, '$1code=bogus'))
      t.equal(signinError(page.url), 'exchange_failed')

      // The same login state resealed with another nonce (as only this service could): the code,
      // state and PKCE verifier are right, the ID token's nonce is not.
      const seal = createLoginStateSeal(stack.config.care360.apiKey)
      const opened = await seal.open(loginState) as NonNullable<Awaited<ReturnType<typeof seal.open>>>
      browser.setCookie(publicUrl, loginCookieFor(url), await seal.seal({ ...opened, nonce: 'another-nonce' }))
      const refused = await browser.navigate(url)
      t.equal(signinError(refused.url), 'invalid_token')
      t.equal(stack.sessionOf(browser), undefined)
    })
  })
}

t.test('an email the service cannot act for gets no session, verified or not', async (t) => {
  // Kills dropping `!email.includes('@') || email.length > 254` from the callback (routes.ts).
  const accounts = [
    { subject: 'patient-no-at', email: 'no-at-sign.example.com', name: 'No At', emailVerified: true },
    { subject: 'patient-long', email: `${'a'.repeat(243)}@example.com`, name: 'Long', emailVerified: true }
  ]
  const stack = await startWebStack(t, { accounts })
  for (const { email } of accounts) {
    const browser = new Browser()
    const page = await stack.signIn(browser, email)
    t.equal(signinError(page.url), 'email_unverified', `${email.slice(0, 24)}… (${email.length} characters)`)
    t.equal(stack.sessionOf(browser), undefined)
  }
})

t.test('the token endpoint: the client authenticates with client_secret_post, and its ID token must bear the IdP\'s signature', async (t) => {
  const stack = await startWebStack(t)
  const tokenEndpoint = `${stack.idp.url}/token`
  const original = globalThis.fetch
  const requests: Array<{ authorization: string | null, body: URLSearchParams }> = []
  let forge = false
  let discoveryDown = false
  const { privateKey: foreignKey } = await generateKeyPair('RS256')
  // The service's own requests to the IdP (openid-client calls the global fetch); the browser's
  // go through untouched.
  globalThis.fetch = async function watched (input: string | URL | Request, init?: RequestInit): Promise<Response> {
    const url = String(input instanceof Request ? input.url : input)
    if (discoveryDown && url.endsWith('/.well-known/openid-configuration')) throw new TypeError('fetch failed')
    if (url !== tokenEndpoint) return await original(input, init)
    requests.push({ authorization: new Headers(init?.headers).get('authorization'), body: new URLSearchParams(String(init?.body)) })
    const response = await original(input, init)
    if (!forge) return response
    // The IdP's answer, its ID token re-signed with a key the IdP never published, under its kid:
    // the TLS channel alone would vouch for it.
    const tokens = await response.json() as Record<string, unknown>
    const idToken = tokens.id_token as string
    tokens.id_token = await new SignJWT(decodeJwt(idToken)).setProtectedHeader(decodeProtectedHeader(idToken) as { alg: string }).sign(foreignKey)
    return new Response(JSON.stringify(tokens), { status: response.status, headers: { 'content-type': 'application/json' } })
  }
  t.teardown(() => { globalThis.fetch = original })

  // Kills ClientSecretPost -> ClientSecretBasic (oidc.ts): the registration says client_secret_post,
  // which an IdP may enforce (the development one does not).
  const browser = new Browser()
  t.equal(signinError((await stack.signIn(browser, 'alice@example.com')).url), null, 'signed in')
  t.equal(requests.length, 1, 'one token request')
  t.equal(requests[0]?.authorization, null, 'no Authorization header (client_secret_basic)')
  t.equal(requests[0]?.body.get('client_id'), stack.idp.clientId, 'the client id in the body')
  t.ok(requests[0]?.body.get('client_secret') === stack.idp.clientSecret, 'the secret in the body')

  // Kills dropping enableNonRepudiationChecks (oidc.ts): openid-client would take the token
  // endpoint's word for the ID token, signature unchecked.
  forge = true
  const forged = new Browser()
  const page = await forged.navigate(await stack.callbackUrl(forged, 'alice@example.com'))
  const forgedReason = signinError(page.url)
  t.not(forgedReason, null, `an ID token with a signature not the IdP's is refused (${String(forgedReason)})`)
  t.equal(stack.sessionOf(forged), undefined, 'no session')
  forge = false

  // Kills keeping a failed discovery (oidc.ts forgetFailedDiscovery): a replica whose first
  // discovery failed must try again on the next sign-in.
  const replica = await buildTestApp(t, { env: stack.env })
  discoveryDown = true
  t.equal((await replica.app.inject({ method: 'GET', url: '/auth/login' })).headers.location, `${stack.publicUrl}/?signin_error=idp_unavailable`, 'discovery failed')
  discoveryDown = false
  t.ok(String((await replica.app.inject({ method: 'GET', url: '/auth/login' })).headers.location).startsWith(`${stack.idp.url}/`), 'tried again, and on to the IdP')

  // openid-client 6 reports a bad ID token signature as OAUTH_INVALID_RESPONSE, the signature in
  // its cause; it was reported as exchange_failed (mutation review).
  t.equal(forgedReason, 'invalid_token', 'a forged ID token signature is reported as invalid_token')
})

t.test('identity provider down', async (t) => {
  const stack = await startWebStack(t, { redis: true })
  const { publicUrl, idp } = stack
  const browser = new Browser()
  const url = await stack.callbackUrl(browser, 'alice@example.com')
  // A second replica that never reached the IdP, sharing the store.
  const lines: string[] = []
  const replica = await buildTestApp(t, { env: stack.env, redis: stack.redis as NonNullable<typeof stack.redis>, logStream: { write: (line: string) => { lines.push(line) } } })
  const signedIn = new Browser()
  await stack.signIn(signedIn, 'bob@example.com')
  await idp.close()

  const failed = await browser.navigate(url)
  t.equal(signinError(failed.url), 'idp_unavailable', 'token endpoint unreachable')
  t.equal(stack.sessionOf(browser), undefined)

  const login = await replica.app.inject({ method: 'GET', url: '/auth/login' })
  t.equal(login.statusCode, 302)
  t.equal(login.headers.location, `${publicUrl}/?signin_error=idp_unavailable`, 'discovery unreachable')
  t.equal(login.headers['set-cookie'], undefined, 'no login state')
  await replica.app.inject({ method: 'GET', url: '/auth/login' })
  const warnings = lines.map((line) => JSON.parse(line) as { level: number, msg: string, signinError?: string, cause?: { name?: string } }).filter((line) => line.level === 40)
  t.equal(warnings.length, 1, 'the operator is warned, once for the two sign-ins')
  t.match(warnings[0], { msg: 'web sign-in failed: idp_unavailable', signinError: 'idp_unavailable', cause: { name: String } })

  // Sign-out still works, just without the IdP's end-session URL.
  const logout = await replica.app.inject({ method: 'POST', url: '/auth/logout', headers: { 'x-csrf': '1' }, cookies: { [SESSION_COOKIE]: stack.sessionOf(signedIn) as string } })
  t.equal(logout.statusCode, 200)
  t.same((logout.json() as { data: unknown }).data, {})
})

t.test('a token endpoint that never answers: idp_unavailable once the IdP deadline passes', async (t) => {
  const stack = await startWebStack(t)
  const browser = new Browser()
  const url = await stack.callbackUrl(browser, 'alice@example.com')
  // The IdP hangs: its port still accepts connections and reads what comes, and never answers.
  const port = Number(new URL(stack.idp.url).port)
  await stack.idp.close()
  const sockets = new Set<Socket>()
  const silent = createServer((socket) => {
    sockets.add(socket)
    socket.resume()
  })
  silent.listen(port, '127.0.0.1')
  await once(silent, 'listening')
  t.teardown(() => {
    for (const socket of sockets) socket.destroy()
    silent.close()
  })

  const started = Date.now()
  const failed = await browser.navigate(url)
  t.equal(signinError(failed.url), 'idp_unavailable', 'not exchange_failed: the IdP never answered')
  t.ok(Date.now() - started >= 4900, `answered after the IdP's 5 s deadline (${Date.now() - started} ms)`)
  t.ok(sockets.size > 0, 'the token request reached the hanging IdP')
  t.equal(stack.sessionOf(browser), undefined)
})

t.test('identity provider down before the callback on a fresh replica', async (t) => {
  const stack = await startWebStack(t)
  const browser = new Browser()
  const url = await stack.callbackUrl(browser, 'alice@example.com')
  const replica = await buildTestApp(t, { env: stack.env })
  await stack.idp.close()
  const answer = await replica.app.inject({ method: 'GET', url: url.slice(stack.publicUrl.length), cookies: { [loginCookieFor(url)]: browser.cookie(stack.publicUrl, loginCookieFor(url)) as string } })
  t.equal(answer.headers.location, `${stack.publicUrl}/?signin_error=idp_unavailable`)
})

t.test('session store down at the callback: session_unavailable, no 5xx', async (t) => {
  const stack = await startWebStack(t, { redis: true })
  const browser = new Browser()
  const url = await stack.callbackUrl(browser, 'alice@example.com')
  await stack.redis?.stop()
  const page = await browser.fetch(url)
  t.equal(page.status, 302)
  t.equal(signinError(page.headers.get('location') as string), 'session_unavailable')
})

t.test('the callback refused before it runs (the per-IP limit, a request without Host): back to the app with signin_error', async (t) => {
  const stack = await startWebStack(t, { env: { RATE_LIMIT_IP: '2/1m' } })
  const browser = new Browser()
  const url = await stack.callbackUrl(browser, 'alice@example.com')
  t.equal((await browser.fetch(`${stack.publicUrl}/auth/me`)).status, 200, 'the address\'s second request')
  const refused = await browser.fetch(url)
  t.equal(refused.status, 302, 'not the JSON 429')
  t.equal(refused.headers.get('location'), `${stack.publicUrl}/?signin_error=rate_limited`)
  t.equal(refused.headers.get('content-type'), null)
  t.equal(await refused.text(), '')
  t.equal(stack.sessionOf(browser), undefined, 'no session')
  // So does a sign-in begun meanwhile, a navigation too.
  const login = await browser.fetch(`${stack.publicUrl}/auth/login`)
  t.equal(login.status, 302)
  t.equal(login.headers.get('location'), `${stack.publicUrl}/?signin_error=rate_limited`)

  const { port } = new URL(stack.publicUrl)
  const socket = connectTo(Number(port))
  socket.end('GET /auth/callback?code=x&state=y HTTP/1.1\r\n\r\n')
  let text = ''
  for await (const chunk of socket) text += String(chunk)
  t.match(text, /^HTTP\/1\.1 302 /)
  t.match(text, new RegExp(`\r\nlocation: ${stack.publicUrl.replace(/[.]/g, '\\.')}/\\?signin_error=server_error\r\n`, 'i'))
})

t.test('an IdP without end-session: sign-out gives no endSessionUrl', async (t) => {
  const stack = await startWebStack(t, { noEndSession: true })
  const browser = new Browser()
  await stack.signIn(browser, 'alice@example.com')
  const logout = await browser.fetch(`${stack.publicUrl}/auth/logout`, { method: 'POST', headers: { 'x-csrf': '1' } })
  t.same(((await logout.json()) as { data: unknown }).data, {})
  // Nor when the session had ended: the 401 as it is, the cookie cleared.
  const again = new Browser()
  await stack.signIn(again, 'alice@example.com')
  await stack.app.sessions.revoke(stack.sessionOf(again) as string)
  const ended = await again.fetch(`${stack.publicUrl}/auth/logout`, { method: 'POST', headers: { 'x-csrf': '1' } })
  t.equal(ended.status, 401)
  t.equal(((await ended.json()) as { data?: unknown }).data, undefined)
  t.equal(stack.sessionOf(again), undefined)
})

t.test('a sign-out with an ended session never waits on the IdP: a replica without discovery answers without the URL, and has it next time', async (t) => {
  const stack = await startWebStack(t)
  const fresh = await buildTestApp(t, { env: stack.env })
  const logout = async (): Promise<{ statusCode: number, data?: { endSessionUrl?: string } }> => {
    const answer = await fresh.app.inject({ method: 'POST', url: '/auth/logout', headers: { 'x-csrf': '1' }, cookies: { [SESSION_COOKIE]: 'A'.repeat(43) } })
    return { statusCode: answer.statusCode, ...(answer.json() as { data?: { endSessionUrl?: string } }) }
  }
  const first = await logout()
  t.equal(first.statusCode, 401)
  t.equal(first.data, undefined, 'no discovery made yet: no URL, no wait')
  let next = await logout()
  for (let i = 0; i < 100 && next.data === undefined; i++) {
    await new Promise((resolve) => setTimeout(resolve, 20))
    next = await logout()
  }
  t.ok(next.data?.endSessionUrl?.startsWith(stack.idp.url), 'the discovery it started serves the next')
})

t.test('without a web client the web sign-in routes do not exist', async (t) => {
  const { app, issuer } = await buildTestApp(t)
  for (const [method, url] of [['GET', '/auth/login'], ['GET', '/auth/callback'], ['POST', '/auth/backchannel-logout']] as const) {
    const answer = await app.inject({ method, url })
    t.equal(answer.statusCode, 404, `${method} ${url}`)
    t.equal((answer.json() as { code: string }).code, 'NOT_FOUND')
  }
  const token = await mobileSignIn(app, issuer)
  const logout = await app.inject({ method: 'POST', url: '/auth/logout', headers: { authorization: `Bearer ${token}` } })
  t.same((logout.json() as { data: unknown }).data, { endSessionUrl: `${issuer.url}/logout` }, 'a mobile-only service still names the provider\'s endpoint (from the discovery its ID tokens use)')
  const withCookie = await app.inject({ method: 'POST', url: '/auth/logout', headers: { 'x-csrf': '1' }, cookies: { [SESSION_COOKIE]: 'A'.repeat(43) } })
  t.equal(withCookie.statusCode, 401)
  t.equal((withCookie.json() as { data?: unknown }).data, undefined, 'no web client: no end-session URL')
})

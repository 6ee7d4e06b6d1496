import t from 'tap'
import * as client from 'openid-client'
import { safeReturnTo } from '../../src/web/return-to.js'
import { exchangeFailure } from '../../src/web/routes.js'
import { createWebOidc } from '../../src/web/oidc.js'
import { createLoginStateSeal } from '../../src/web/login-state.js'
import { loginCookieName } from '../../src/web/cookies.js'
import { startDevIdp } from '../../src/web/dev-idp.js'

/** The pieces of web sign-in on their own: returnTo, the error vocabulary, the sealed login state. */

t.test('returnTo: a path on this service, else /', async (t) => {
  const kept = ['/', '/appointments', '/appointments?tab=upcoming&x=https://a.example', '/a/b#frag', '/caf%C3%A9', '/a%20b']
  for (const value of kept) t.equal(safeReturnTo(value), value, `kept: ${value}`)
  // A header value must be ASCII: the rest is percent-encoded, as a browser would send it.
  t.equal(safeReturnTo('/café?q=€#ü'), '/caf%C3%A9?q=%E2%82%AC#%C3%BC')
  t.equal(safeReturnTo('/a b'), '/a%20b')
  const refused: unknown[] = [
    undefined, 42, ['/a'], '', 'a', 'relative/path', '//evil.com', '///evil.com', '/\\evil.com', '\\\\evil.com',
    'https://evil.com', 'javascript:alert(1)', '/%2F%2Fevil.com', '/%2f/evil.com', '/%5Cevil.com', '\t//evil',
    '/\t/evil.com', '/a\nb', '/a\u0000', '/a\u007f', '/%0d%0aSet-Cookie:x', '/%E0%A4%A', '/..//evil.com', '/a//b',
    // Dot segments, even encoded, go before the check: each of these resolves to /%2fevil.com.
    '/%2e/%2fevil.com', '/a/%2e%2e/%2fevil.com', '/%2e%2e/%2Fevil.com', '/./%2f%2fevil.com', '/a/%2E%2E/%5cevil.com',
    // Or within one segment, which the parser keeps and a decoding router resolves to //evil.com.
    '/%2e%2e%2f%2fevil.com', '/a/..%2f%2fevil.com', '/a/%2E%2E%2F%2Fevil.com', '/a%2fb',
    // Or by a router that decodes twice: an encoded percent sign is refused whatever follows it.
    '/%252F%252Fevil.example', '/%255Cevil.com', '/a/%252e%252e/%252f%252fevil.com', '/100%25',
    `/${'a'.repeat(1100)}`
  ]
  for (const value of refused) t.equal(safeReturnTo(value), '/', `refused: ${JSON.stringify(value)?.slice(0, 40)}`)

  // What leaves is bounded, not only what came: percent-encoding makes a path up to nine times
  // longer, and the result is sealed into the login cookie, which browsers drop beyond 4096 bytes.
  // What came is bounded too, before it is parsed: dot segments that resolve to a short path do
  // not let a longer value through (kills dropping `value.length > MAX_LENGTH`, return-to.ts).
  t.equal(safeReturnTo(`/${'a/../'.repeat(300)}b`), '/', 'a value of 1502 characters that resolves to /b')
  t.equal(safeReturnTo(`/${'./'.repeat(511)}b`), '/b', 'one of 1024 that resolves to /b is kept')
  // No backslash anywhere, not only where a browser would read it as `//` (the URL parser turns
  // `/a\b` into `/a/b`: what left would not be what came).
  for (const value of ['/a\\b', '/a?x=\\', '/a#\\']) t.equal(safeReturnTo(value), '/', `refused: ${JSON.stringify(value)}`)

  const longest = `/${'a'.repeat(1023)}`
  t.equal(safeReturnTo(longest), longest, 'a path of 1024 characters is kept')
  t.equal(safeReturnTo(`/${'é'.repeat(600)}`), '/', 'one that encodes to 3601 is not')
  t.equal(safeReturnTo(`/${'"'.repeat(1000)}`), '/', 'nor one of ASCII that encodes to 3001')
  const seal = createLoginStateSeal('a key root of the deployment')
  const random = 'x'.repeat(43)
  const sealed = await seal.seal({ state: random, nonce: random, codeVerifier: random, previousSession: random, returnTo: safeReturnTo(longest) })
  const cookie = `${loginCookieName(random)}=${sealed}; Max-Age=600; Path=/; HttpOnly; Secure; SameSite=Lax`
  t.ok(cookie.length < 4096, `the largest login cookie fits a browser's limit (${cookie.length} bytes)`)
})

t.test('exchange failures map to fixed reasons', async (t) => {
  const coded = (code: string) => Object.assign(new Error('x'), { code })
  // As openid-client passes them on: fetch's own TypeError, and its ClientError for a deadline
  // (test/web/sign-in.test.ts has a real token endpoint that never answers).
  t.equal(exchangeFailure(new TypeError('fetch failed')), 'idp_unavailable', 'fetch failed')
  // Its declared constructor takes no code; the built one sets `code` from the options, as here.
  const clientError = (code: string) => Object.assign(new client.ClientError('x'), { code })
  t.equal(exchangeFailure(clientError('OAUTH_TIMEOUT')), 'idp_unavailable')
  t.equal(exchangeFailure(clientError('OAUTH_ABORT')), 'idp_unavailable')
  t.equal(exchangeFailure(clientError('OAUTH_RESPONSE_IS_NOT_CONFORM')), 'exchange_failed')
  t.equal(exchangeFailure(coded('OAUTH_JWT_CLAIM_COMPARISON_FAILED')), 'invalid_token')
  // A failed signature, as oauth4webapi reports it: an invalid response with the signature in its cause.
  const invalidResponse = (cause: unknown) => Object.assign(new Error('invalid response encountered', { cause }), { code: 'OAUTH_INVALID_RESPONSE' })
  const signature = { signature: new Uint8Array(1), algorithm: 'RSASSA-PKCS1-v1_5' }
  t.equal(exchangeFailure(invalidResponse(signature)), 'invalid_token')
  t.equal(exchangeFailure(invalidResponse(new Error('JWT signature verification failed', { cause: signature }))), 'invalid_token', 'wrapped, as openid-client passes it on')
  t.equal(exchangeFailure(invalidResponse(new Error('a', { cause: new Error('b', { cause: new Error('c', { cause: signature }) }) }))), 'exchange_failed', 'not searched deeper than three causes')
  t.equal(exchangeFailure(invalidResponse(undefined)), 'exchange_failed', 'another invalid response')
  t.equal(exchangeFailure(invalidResponse(null)), 'exchange_failed')
  t.equal(exchangeFailure(invalidResponse('text')), 'exchange_failed')
  t.equal(exchangeFailure(coded('ERR_JWKS_NO_MATCHING_KEY')), 'invalid_token')
  t.equal(exchangeFailure(coded('OAUTH_RESPONSE_IS_NOT_JSON')), 'exchange_failed')
  t.equal(exchangeFailure(new Error('no code')), 'exchange_failed')
  t.equal(exchangeFailure('not even an error'), 'exchange_failed')
})

t.test('the redirect URI comes from PUBLIC_URL, sign-out returns to the web app; https issuers need no exception', async (t) => {
  const oidc = createWebOidc({ issuer: 'https://idp.example', clientId: 'c', clientSecret: 's', publicUrl: 'https://bff.example/base', webAppUrl: 'https://app.example' })
  t.equal(oidc.redirectUri, 'https://bff.example/base/auth/callback')
  t.equal(oidc.postLogoutRedirectUri, 'https://app.example')
  t.equal(oidc.clientId, 'c')
  // Plain http is allowed for a loopback issuer only: elsewhere openid-client refuses it before
  // any request (kills dropping `isLoopbackHost` from the allowInsecureRequests condition, oidc.ts).
  const plain = createWebOidc({ issuer: 'http://idp.example', clientId: 'c', clientSecret: 's', publicUrl: 'https://bff.example', webAppUrl: 'https://app.example' })
  await t.rejects(plain.configuration(), { code: 'OAUTH_HTTP_REQUEST_FORBIDDEN' }, 'no discovery over plain http off loopback')
})

t.test('login state: sealed, bound to the key, short-lived', async (t) => {
  let now = 1_700_000_000_000
  const seal = createLoginStateSeal('org-key-1', () => now)
  const state = { state: 's', nonce: 'n', codeVerifier: 'v', returnTo: '/r' }
  const sealed = await seal.seal(state)
  t.notMatch(sealed, /"v"|codeVerifier/, 'the verifier is not readable')
  // Opened later, it still says when it was sealed, not when it was opened (the callback dates a
  // sign-in without auth_time by it: kills startedAt taken from the clock at open, login-state.ts).
  now += 5_000
  t.same(await seal.open(sealed), { ...state, startedAt: 1_700_000_000 }, 'with when /auth/login sealed it')
  now -= 5_000
  const withPrevious = { ...state, previousSession: 'session-id-hash' }
  t.same(await seal.open(await seal.seal(withPrevious)), { ...withPrevious, startedAt: 1_700_000_000 })
  t.equal(await createLoginStateSeal('org-key-2', () => now).open(sealed), null, 'another deployment cannot open it')
  t.equal(await seal.open(`${sealed.slice(0, -2)}AA`), null, 'tampered')
  t.equal(await seal.open(undefined), null)
  now += 601_000
  t.equal(await seal.open(sealed), null, 'expired after 10 minutes')
})

t.test('development IdP: PKCE required, a broken interaction ends on a plain 400', async (t) => {
  const idp = await startDevIdp({ publicUrl: 'http://127.0.0.1:9' })
  t.teardown(() => idp.close())
  t.match(idp.clientSecret, /^[A-Za-z0-9_-]{32}$/, 'a random client secret unless given one')
  // PKCE is required of the confidential client too: no code_challenge, no authorization.
  const withoutPkce = await fetch(`${idp.url}/auth?${new URLSearchParams({ client_id: idp.clientId, response_type: 'code', scope: 'openid email', redirect_uri: 'http://127.0.0.1:9/auth/callback' })}`, { redirect: 'manual' })
  const refused = new URL(withoutPkce.headers.get('location') as string)
  t.equal(refused.searchParams.get('error'), 'invalid_request')
  t.match(refused.searchParams.get('error_description'), /requires PKCE/)

  const answer = await fetch(`${idp.url}/interaction/unknown`)
  t.equal(answer.status, 400)
  t.equal(await answer.text(), 'interaction failed')
  await idp.close()
  await idp.close()
})

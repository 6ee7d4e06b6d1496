import t from 'tap'
import type { InjectOptions } from 'fastify'
import { Browser } from './browser.js'
import { SESSION_COOKIE, startWebStack, type WebStack } from './stack.js'
import { createCsrfCheck, csrfFailure } from '../../src/web/csrf.js'

/**
 * CSRF, CORS and security headers, on every route the app registers: the route list comes from
 * the app itself, so a route added later is covered without touching this file.
 */

const ALICE_APPOINTMENT = '3f0b5d2e-8a41-4c1e-9f27-1a6d3c8e5b01'
const APP_ORIGIN = 'https://app.example.com'
const SAFE = new Set(['GET', 'HEAD', 'OPTIONS'])
/**
 * The unsafe requests that act in no session, so that no ambient cookie is theirs to abuse: the
 * mobile sign-in (its token comes back in the body, no cookie is set), the IdP's back-channel
 * logout, and no route at all. Every other unsafe route, one added later included, is checked.
 */
const AUTHENTICATE_NO_ONE = new Set(['POST /auth/session', 'POST /auth/backchannel-logout', 'POST /no/such/route', 'DELETE /auth/me'])

/**
 * Every (method, path) the app serves, from `printRoutes`: a tree whose nodes are path pieces
 * (4 columns of indent per level), a node's full path being its ancestors' pieces joined.
 */
function registeredRoutes (stack: WebStack): Array<{ method: string, path: string }> {
  const routes: Array<{ method: string, path: string }> = []
  const pieces: string[] = []
  for (const line of stack.app.printRoutes({ commonPrefix: false }).split('\n')) {
    const match = /^((?:[│ ] {3})*)[├└]── (\S+)(?: \(([A-Z, ]+)\))?$/.exec(line)
    if (match === null) continue
    const depth = (match[1] as string).length / 4
    pieces.length = depth
    pieces.push(match[2] as string)
    if (match[3] === undefined) continue
    for (const method of match[3].split(', ')) routes.push({ method, path: pieces.join('') })
  }
  return routes
}

function concrete (path: string): string {
  return path.replace(/:id\b/g, ALICE_APPOINTMENT).replace(/\*$/, 'anything')
}

async function freshCookie (stack: WebStack): Promise<string> {
  const browser = new Browser()
  await stack.signIn(browser, 'alice@example.com')
  return stack.sessionOf(browser) as string
}

for (const store of ['memory', 'redis'] as const) {
  t.test(`${store} store: CSRF on every unsafe route`, async (t) => {
    const stack = await startWebStack(t, {
      redis: store === 'redis',
      env: { CORS_ORIGINS: APP_ORIGIN, RATE_LIMIT_SESSION: '10000/1m', RATE_LIMIT_CANCEL: '10000/1m', RATE_LIMIT_IP: '10000/1m' }
    })
    const routes = registeredRoutes(stack)
    const unsafe = routes.filter((route) => !SAFE.has(route.method))
    for (const expected of ['POST /auth/session', 'POST /auth/logout', 'POST /auth/backchannel-logout', 'POST /appointments/:id/cancel']) {
      t.ok(unsafe.some((route) => `${route.method} ${route.path}` === expected), `enumerated: ${expected}`)
    }
    // And an unknown path: the hook is global, not per route.
    unsafe.push({ method: 'POST', path: '/no/such/route' }, { method: 'DELETE', path: '/auth/me' })

    const cookie = await freshCookie(stack)
    const withCookie = (extra: Partial<InjectOptions> & { headers?: Record<string, string> } = {}): InjectOptions => ({
      ...extra,
      cookies: { [SESSION_COOKIE]: cookie },
      headers: { ...extra.headers }
    })

    for (const route of unsafe) {
      const url = concrete(route.path)
      const name = `${route.method} ${route.path}`
      const method = route.method as InjectOptions['method']
      const refused = async (label: string, options: InjectOptions): Promise<void> => {
        const answer = await stack.app.inject({ method, url, ...options })
        t.equal(answer.statusCode, 403, `${name}: ${label} → 403`)
        t.equal((answer.json() as { code: string }).code, 'CSRF_REJECTED')
        t.equal(answer.headers['cache-control'], 'no-store')
      }
      const unknownCookie = await stack.app.inject({ method, url, cookies: { [SESSION_COOKIE]: 'A'.repeat(43) } })
      if (AUTHENTICATE_NO_ONE.has(name)) {
        // No session to act in: a cookie sent along, live or stale, is no credential here.
        for (const options of [withCookie(), withCookie({ headers: { 'sec-fetch-site': 'cross-site' } })]) {
          const answer = await stack.app.inject({ method, url, ...options })
          t.not(answer.statusCode, 403, `${name}: the cookie is not looked at → ${answer.statusCode}`)
        }
        t.not(unknownCookie.statusCode, 403, `${name}: a stale cookie neither → ${unknownCookie.statusCode}`)
      } else {
        await refused('cookie, no X-CSRF', withCookie())
        await refused('cookie, X-CSRF: 0', withCookie({ headers: { 'x-csrf': '0' } }))
        await refused('foreign Origin', withCookie({ headers: { 'x-csrf': '1', origin: 'https://evil.example' } }))
        await refused('Origin: null', withCookie({ headers: { 'x-csrf': '1', origin: 'null' } }))
        await refused('Sec-Fetch-Site: cross-site', withCookie({ headers: { 'x-csrf': '1', 'sec-fetch-site': 'cross-site' } }))
        await refused('form-encoded cross-site post', withCookie({ headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: 'a=1' }))
        // A route that acts in a session refuses an unknown one first (401, contract step 1).
        t.equal(unknownCookie.statusCode, 401, `${name}: unknown cookie, no X-CSRF → 401`)
      }

      const wrongType = await stack.app.inject({ method, url, ...withCookie({ headers: { 'x-csrf': '1', origin: stack.publicUrl, 'content-type': 'text/plain' }, payload: 'x' }) })
      t.equal(wrongType.statusCode, route.path === '/no/such/route' || route.path === '/auth/me' ? 404 : 415, `${name}: wrong content type → 415`)

      const bearer = await stack.bearerFor('bob@example.com')
      const viaBearer = await stack.app.inject({ method, url, headers: { authorization: `Bearer ${bearer}` } })
      t.not(viaBearer.statusCode, 403, `${name}: bearer without X-CSRF → ${viaBearer.statusCode}`)
      const bearerAndCookie = await stack.app.inject({ method, url, headers: { authorization: `Bearer ${await stack.bearerFor('bob@example.com')}` }, cookies: { [SESSION_COOKIE]: cookie } })
      t.not(bearerAndCookie.statusCode, 403, `${name}: bearer wins over an ambient cookie`)
      const anonymous = await stack.app.inject({ method, url })
      t.not(anonymous.statusCode, 403, `${name}: no credentials → ${anonymous.statusCode}`)
    }
    t.match(await stack.app.inject({ method: 'GET', url: '/auth/me', cookies: { [SESSION_COOKIE]: cookie } }).then((answer) => answer.json()), { data: { authenticated: true } }, 'nothing above ended the session')

    t.test('the checks pass for our own origins', async (t) => {
      for (const origin of [stack.publicUrl, APP_ORIGIN, undefined]) {
        const answer = await stack.app.inject({
          method: 'POST',
          url: '/auth/logout',
          headers: { 'x-csrf': '1', 'sec-fetch-site': 'same-origin', ...(origin === undefined ? {} : { origin }) },
          cookies: { [SESSION_COOKIE]: await freshCookie(stack) }
        })
        t.equal(answer.statusCode, 200, `Origin ${String(origin)}`)
      }
    })
  })
}

for (const store of ['memory', 'redis'] as const) {
  t.test(`${store} store: a forged request spends none of its victim's session or cancel quota`, async (t) => {
    const stack = await startWebStack(t, { redis: store === 'redis', env: { RATE_LIMIT_SESSION: '3/1m', RATE_LIMIT_CANCEL: '1/1m' } })
    const cookie = await freshCookie(stack)
    const cancel = `/appointments/${ALICE_APPOINTMENT}/cancel`
    for (let i = 0; i < 5; i++) {
      const forged = await stack.app.inject({ method: 'POST', url: cancel, cookies: { [SESSION_COOKIE]: cookie } })
      t.equal(forged.statusCode, 403, `forged cancel ${i + 1} → 403`)
      t.notMatch(String(forged.headers['ratelimit-policy']), /session|cancel/, 'counted against no session limit')
    }
    const me = await stack.app.inject({ method: 'GET', url: '/auth/me', cookies: { [SESSION_COOKIE]: cookie } })
    t.equal(me.statusCode, 200)
    t.match(String(me.headers.ratelimit), /"session";r=2;/, 'the first of the session\'s own requests: 2 of 3 left')
    const own = await stack.app.inject({ method: 'POST', url: cancel, headers: { 'x-csrf': '1' }, cookies: { [SESSION_COOKIE]: cookie } })
    // This stack has no upstream (502 past the limits); what matters is that the cancel got there.
    t.notOk([401, 403, 429].includes(own.statusCode), `the patient's own cancel passes its checks and limits: ${own.statusCode}`)
    t.match(String(own.headers.ratelimit), /"session";r=1;.*"cancel";r=0;/, 'its one cancel of the window')
  })
}

t.test('a web view with a stale session cookie signs in on the mobile route (no 403)', async (t) => {
  const stack = await startWebStack(t)
  const idToken = await stack.signAsIdp({ sub: 'mobile-carol', email: 'carol@example.com', email_verified: true })
  const answer = await stack.app.inject({ method: 'POST', url: '/auth/session', payload: { idToken }, cookies: { [SESSION_COOKIE]: 'garbage' } })
  t.equal(answer.statusCode, 201)
  t.match(answer.json(), { data: { email: 'carol@example.com' } })
})

t.test('CORS with credentials for CORS_ORIGINS only', async (t) => {
  const stack = await startWebStack(t, { env: { CORS_ORIGINS: APP_ORIGIN } })
  const preflight = (origin: string) => stack.app.inject({
    method: 'OPTIONS',
    url: `/appointments/${ALICE_APPOINTMENT}/cancel`,
    headers: { origin, 'access-control-request-method': 'POST', 'access-control-request-headers': 'content-type,x-csrf,idempotency-key' }
  })
  for (const origin of [APP_ORIGIN, stack.publicUrl]) {
    const answer = await preflight(origin)
    t.equal(answer.statusCode, 204)
    t.equal(answer.headers['access-control-allow-origin'], origin)
    t.equal(answer.headers['access-control-allow-credentials'], 'true')
    t.match(answer.headers['access-control-allow-headers'], /x-csrf/)
    t.match(answer.headers['access-control-allow-headers'], /idempotency-key/)
    t.match(answer.headers['access-control-allow-methods'], /POST/)
  }
  const evil = await preflight('https://evil.example')
  // Without Access-Control-Allow-Origin the browser grants nothing, whatever else is sent.
  t.equal(evil.headers['access-control-allow-origin'], undefined, 'a foreign origin gets no CORS grant')
  t.equal(evil.headers['access-control-allow-methods'], undefined, 'nor the methods and headers it may use')
  t.equal(evil.headers['access-control-allow-headers'], undefined)

  const simple = await stack.app.inject({ method: 'GET', url: '/auth/me', headers: { origin: APP_ORIGIN } })
  t.equal(simple.headers['access-control-allow-origin'], APP_ORIGIN)
  t.equal(simple.headers['access-control-allow-credentials'], 'true')
  t.match(simple.headers['access-control-expose-headers'], /x-request-id/)
  t.match(simple.headers['access-control-expose-headers'], /retry-after/)
  t.match(simple.headers['access-control-expose-headers'], /idempotent-replayed/)
  t.match(simple.headers.vary, /Origin/i)
  const foreign = await stack.app.inject({ method: 'GET', url: '/auth/me', headers: { origin: 'https://evil.example' } })
  t.equal(foreign.headers['access-control-allow-origin'], undefined)
  t.equal(foreign.headers['access-control-expose-headers'], undefined, 'nor the headers it may read')
  // An OPTIONS request without Origin is no preflight: answered here all the same, a bare 204.
  const noOrigin = await stack.app.inject({ method: 'OPTIONS', url: '/auth/me' })
  t.equal(noOrigin.statusCode, 204, 'an OPTIONS without Origin: 204, not the route\'s or the not-found answer')
  t.equal(noOrigin.body, '')
  t.equal(noOrigin.headers['access-control-allow-origin'], undefined)
})

t.test('security headers on every answer, errors and redirects included', async (t) => {
  const stack = await startWebStack(t, { env: { TRUST_PROXY: '127.0.0.1' } })
  const answers = {
    ok: await stack.app.inject({ method: 'GET', url: '/healthz' }),
    notFound: await stack.app.inject({ method: 'GET', url: '/nope' }),
    unauthenticated: await stack.app.inject({ method: 'GET', url: '/appointments' }),
    csrf: await stack.app.inject({ method: 'POST', url: '/auth/logout', cookies: { [SESSION_COOKIE]: 'A'.repeat(43) } }),
    badJson: await stack.app.inject({ method: 'POST', url: '/auth/session', headers: { 'content-type': 'application/json' }, payload: '{' }),
    redirect: await stack.app.inject({ method: 'GET', url: '/auth/login' }),
    backchannel: await stack.app.inject({ method: 'POST', url: '/auth/backchannel-logout', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: '' })
  }
  for (const [name, answer] of Object.entries(answers)) {
    const csp = String(answer.headers['content-security-policy'])
    t.match(csp, /default-src 'none'/, `${name}: CSP`)
    t.match(csp, /frame-ancestors 'none'/, `${name}: frame-ancestors`)
    t.equal(answer.headers['x-content-type-options'], 'nosniff', `${name}: nosniff`)
    t.equal(answer.headers['x-frame-options'], 'DENY', `${name}: frame`)
    t.equal(answer.headers['referrer-policy'], 'no-referrer', `${name}: referrer`)
    t.match(answer.headers['strict-transport-security'], /^max-age=31536000/, `${name}: HSTS`)
    t.equal(answer.headers['cross-origin-resource-policy'], 'same-origin', `${name}: CORP`)
    t.equal(answer.headers['cache-control'], 'no-store', `${name}: no-store`)
    t.ok(answer.headers['x-request-id'], `${name}: request id`)
  }
  t.equal(answers.backchannel.statusCode, 400)

  // Behind a TLS-terminating proxy: the redirect URI still comes from PUBLIC_URL, never from
  // X-Forwarded-Host, and the cookies stay Secure.
  const proxied = await stack.app.inject({
    method: 'GET',
    url: '/auth/login?returnTo=/a',
    headers: { 'x-forwarded-host': 'evil.example', 'x-forwarded-proto': 'http', host: 'evil.example' },
    remoteAddress: '127.0.0.1'
  })
  const authorize = new URL(proxied.headers.location as string)
  t.equal(authorize.origin, stack.idp.url)
  t.equal(authorize.searchParams.get('redirect_uri'), `${stack.publicUrl}/auth/callback`)
  t.equal(authorize.searchParams.get('code_challenge_method'), 'S256')
  t.ok(authorize.searchParams.get('code_challenge'))
  t.ok(authorize.searchParams.get('state'))
  t.ok(authorize.searchParams.get('nonce'))
  t.equal(authorize.searchParams.get('scope'), 'openid email')
  t.match(String(proxied.headers['set-cookie']), /; Secure/)
})

t.test('csrfFailure reasons', async (t) => {
  const allowed = new Set(['https://a.example'])
  const request = (headers: Record<string, string>) => ({ headers }) as unknown as Parameters<typeof csrfFailure>[0]
  t.equal(csrfFailure(request({ 'x-csrf': '1', 'sec-fetch-site': 'cross-site' }), allowed), 'cross-site')
  t.equal(csrfFailure(request({ 'x-csrf': '1, 1' }), allowed), 'header')
  t.equal(csrfFailure(request({ 'x-csrf': '1', origin: 'https://b.example' }), allowed), 'origin')
  t.equal(csrfFailure(request({ 'x-csrf': '1', origin: 'https://a.example', 'sec-fetch-site': 'same-site' }), allowed), null)
})

t.test('createCsrfCheck: every method but GET, HEAD and OPTIONS is checked for a cookie session', async (t) => {
  // The app registers no cookie route with PUT, PATCH or DELETE yet, so the route walk above cannot
  // see a method wrongly made safe (kills adding DELETE to SAFE_METHODS, csrf.ts).
  const check = createCsrfCheck(new Set(['https://a.example']))
  const request = (method: string) => ({ method, headers: {} }) as unknown as Parameters<typeof check>[0]
  for (const method of ['POST', 'PUT', 'PATCH', 'DELETE', 'PROPFIND']) {
    t.equal(check(request(method), 'cookie'), 'header', `${method} with the cookie, no X-CSRF`)
    t.equal(check(request(method), 'bearer'), null, `${method} with a bearer`)
  }
  for (const method of ['GET', 'HEAD', 'OPTIONS']) t.equal(check(request(method), 'cookie'), null, `${method} is safe`)
})

import t, { type Test } from 'tap'
import { Writable } from 'node:stream'
import type { LightMyRequestResponse } from 'fastify'
import { buildTestApp, signIn, TEST_API_KEY } from '../helpers/app.js'
import type { App } from '../../src/app.js'
import { garbageToken } from '../helpers/issuer.js'
import { createPatientRef } from '../../src/auth/plugin.js'
import { sessionIdOf } from '../../src/auth/session-store.js'

const bearer = (token: string) => ({ authorization: `Bearer ${token}` })

function expect401 (t: Test, response: LightMyRequestResponse, name: string): void {
  t.equal(response.statusCode, 401, name)
  t.match(response.json(), { status: 401, success: false, code: 'SESSION_REQUIRED' }, name)
  t.equal(response.headers['cache-control'], 'no-store')
}

for (const store of ['memory', 'redis'] as const) {
  t.test(`happy path with the ${store} store`, async (t) => {
    const { app, issuer } = await buildTestApp(t, { redis: store === 'redis' })
    t.equal(app.sharedState.mode(), store === 'memory' ? 'memory' : 'redis')
    const idToken = await issuer.sign({ email: 'Patient@Example.com', sid: 'idp-1' })
    const created = await app.inject({ method: 'POST', url: '/auth/session', payload: { idToken } })
    t.equal(created.statusCode, 201)
    const body = created.json()
    t.same(Object.keys(body).sort(), ['data', 'message', 'status', 'success'])
    t.match(body, { status: 201, success: true, data: { email: 'Patient@Example.com' } })
    t.same(Object.keys(body.data).sort(), ['email', 'expiresAt', 'token'], 'nothing else leaks')
    t.match(body.data.token, /^[A-Za-z0-9_-]{43}$/)
    t.ok(Math.abs(Date.parse(body.data.expiresAt) - (Date.now() + 30 * 60_000)) < 10_000, 'idle expiry by default')
    t.equal(created.headers['cache-control'], 'no-store')

    const me = await app.inject({ url: '/auth/me', headers: bearer(body.data.token) })
    t.equal(me.statusCode, 200)
    t.same(me.json(), { status: 200, success: true, message: 'OK', data: { authenticated: true, email: 'Patient@Example.com', expiresAt: body.data.expiresAt } })

    // The same ID token again (a second device of the patient, a retry after a lost answer): a
    // second session, until the first is signed out.
    const second = await app.inject({ method: 'POST', url: '/auth/session', payload: { idToken } })
    t.equal(second.statusCode, 201, 'the ID token made another session while its first was live')

    const logout = await app.inject({ method: 'POST', url: '/auth/logout', headers: bearer(body.data.token) })
    t.equal(logout.statusCode, 200)
    t.same(logout.json().data, { endSessionUrl: `${issuer.url}/logout` }, "the provider's end-session endpoint, for the app to end its session there too")
    expect401(t, await app.inject({ method: 'POST', url: '/auth/logout', headers: bearer(body.data.token) }), 'the token is dead after logout')
    t.same((await app.inject({ url: '/auth/me', headers: bearer(body.data.token) })).json().data, { authenticated: false })
    expect401(t, await app.inject({ method: 'POST', url: '/auth/session', payload: { idToken } }), 'signed out: the ID token it was made from cannot sign back in')
    t.equal((await app.inject({ url: '/auth/me', headers: bearer(second.json().data.token) })).json().data.authenticated, true, 'the other session is not this one')
    t.equal((await app.inject({ method: 'POST', url: '/auth/session', payload: { idToken: await issuer.sign({ email: 'Patient@Example.com', sid: 'idp-1', jti: 'another-sign-in' }) } })).statusCode, 201, 'a fresh ID token signs in')
  })
}

t.test('every bad ID token: 401 SESSION_REQUIRED and no session', async (t) => {
  const { app, issuer } = await buildTestApp(t)
  const nowSec = Math.floor(Date.now() / 1000)
  const good = await issuer.sign()
  const [head, payload] = good.split('.')
  const cases: Array<[string, string]> = [
    ['wrong aud', await issuer.sign({ aud: 'another-client' })],
    ['wrong iss', await issuer.sign({ iss: 'https://evil.example' })],
    ['expired', await issuer.sign({ exp: nowSec - 120 })],
    ['nbf in the future', await issuer.sign({ nbf: nowSec + 600 })],
    ['iat too old', await issuer.sign({ iat: nowSec - 3600 })],
    ['bad signature', `${head}.${payload}.${Buffer.alloc(256, 1).toString('base64url')}`],
    ['alg none', await issuer.sign({}, { alg: 'none' })],
    ['HS256', await issuer.sign({}, { alg: 'HS256' })],
    ['unknown kid', await issuer.sign({}, { key: 'unknown' })],
    ['unverified email', await issuer.sign({ email_verified: false })],
    ['missing email', await issuer.sign({ email: undefined })],
    ['garbage', garbageToken()],
    ['too long', `${good}.${'a'.repeat(9000 - good.length)}`]
  ]
  const jwksBefore = issuer.hits.jwks
  for (const [name, idToken] of cases) {
    const response = await app.inject({ method: 'POST', url: '/auth/session', payload: { idToken } })
    expect401(t, response, name)
    t.equal(response.headers['www-authenticate'], 'Bearer', `${name}: a 401 carries its challenge (RFC 9110)`)
    // Which check failed is never told, but for the one the patient can act on, once the token is
    // known to be the provider's: an unverified email.
    if (name === 'unverified email') t.match(response.json().message, /not verified with your sign-in provider/, name)
    else t.equal(response.json().message, 'Invalid ID token', `${name}: the same message for every other check`)
  }
  t.equal(issuer.hits.jwks - jwksBefore, 2, 'one fetch plus the one refresh for the unknown kid')
  const sessions = app.sessions as unknown as { size: number }
  t.equal(sessions.size, 0, 'no session was created')
})

t.test('body validation of POST /auth/session', async (t) => {
  const { app, issuer } = await buildTestApp(t)
  const idToken = await issuer.sign()
  const post = (payload: unknown, headers: Record<string, string> = {}) =>
    app.inject({ method: 'POST', url: '/auth/session', payload: payload as string, headers: { 'content-type': 'application/json', ...headers } })
  const extra = await post(JSON.stringify({ idToken, email: 'x@example.com' }))
  t.equal(extra.statusCode, 400)
  t.equal(extra.json().code, 'VALIDATION_FAILED')
  t.equal((await post(JSON.stringify({}))).statusCode, 400)
  t.equal((await post(JSON.stringify({ idToken: 42 }))).statusCode, 400)
  t.equal((await post(JSON.stringify({ idToken: '' }))).statusCode, 400)
  t.equal((await post('')).statusCode, 400, 'no body')
  t.equal((await post(JSON.stringify({ idToken: 'x'.repeat(20_000) }))).statusCode, 413)
  t.equal((await post(`idToken=${idToken}`, { 'content-type': 'application/x-www-form-urlencoded' })).statusCode, 415)
})

t.test('GET /auth/me without, or with a bad, session', async (t) => {
  const { app } = await buildTestApp(t)
  for (const headers of [{}, bearer('A'.repeat(43)), bearer('short'), { authorization: 'Basic dXNlcjpwYXNz' }]) {
    const response = await app.inject({ url: '/auth/me', headers })
    t.equal(response.statusCode, 200)
    t.same(response.json().data, { authenticated: false })
  }
})

t.test('a mobile sign-out names the end-session endpoint from the start, and never waits on the provider for it', async (t) => {
  const { app, issuer, redis } = await buildTestApp(t, { redis: true })
  const tokens = [await signIn(app, issuer, 'carol@example.com'), await signIn(app, issuer, 'carol@example.com'), await signIn(app, issuer, 'carol@example.com')]
  const replica = async (): Promise<App> => (await buildTestApp(t, { redis, env: { OIDC_ISSUER: issuer.url, OIDC_CLIENT_ID: issuer.clientId } })).app
  const discoveries = (): number => issuer.hits.discovery
  const settled = async (from: number): Promise<void> => {
    while (discoveries() === from) await new Promise((resolve) => setTimeout(resolve, 10))
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  // A replica that has verified no token yet: its discovery was made as it started.
  let before = discoveries()
  const fresh = await replica()
  await settled(before)
  const first = await fresh.inject({ method: 'POST', url: '/auth/logout', headers: bearer(tokens[0] as string) })
  t.same(first.json().data, { endSessionUrl: `${issuer.url}/logout` }, 'the first sign-out on a fresh replica has it')
  // One whose discovery failed as it started (the IdP down): signed out at once, without it, and
  // a discovery begins for the next.
  issuer.behaviour.discoveryStatus = 503
  before = discoveries()
  const unlucky = await replica()
  await settled(before)
  issuer.behaviour.discoveryStatus = 200
  before = discoveries()
  const second = await unlucky.inject({ method: 'POST', url: '/auth/logout', headers: bearer(tokens[1] as string) })
  t.equal(second.statusCode, 200)
  t.same(second.json().data, {}, 'no URL rather than a wait on the provider')
  await settled(before)
  const third = await unlucky.inject({ method: 'POST', url: '/auth/logout', headers: bearer(tokens[2] as string) })
  t.same(third.json().data, { endSessionUrl: `${issuer.url}/logout` }, 'the discovery it began serves the next sign-out')
})

t.test('POST /auth/logout needs a session', async (t) => {
  const { app } = await buildTestApp(t)
  expect401(t, await app.inject({ method: 'POST', url: '/auth/logout' }), 'none')
  expect401(t, await app.inject({ method: 'POST', url: '/auth/logout', headers: bearer('A'.repeat(43)) }), 'unknown')
  expect401(t, await app.inject({ method: 'POST', url: '/auth/logout', headers: { authorization: 'Bearer' } }), 'empty bearer')
})

t.test('bearer parsing: case-insensitive scheme, one token only', async (t) => {
  const { app, issuer } = await buildTestApp(t)
  const token = await signIn(app, issuer, 'one@example.com')
  for (const authorization of [`bearer ${token}`, `BEARER  ${token}`, `Bearer\t${token} `]) {
    t.equal((await app.inject({ url: '/auth/me', headers: { authorization } })).json().data.email, 'one@example.com', authorization.slice(0, 8))
  }
  expect401(t, await app.inject({ method: 'POST', url: '/auth/logout', headers: { authorization: `Bearer ${token} extra` } }), 'two tokens')
  expect401(t, await app.inject({ method: 'POST', url: '/auth/logout', headers: { authorization: `Bearer${token}` } }), 'no space')
})

t.test('malformed bearer tokens are refused without a store lookup', async (t) => {
  // With Redis down, any lookup would be a 503: a 401 proves none was made.
  const { app, redis } = await buildTestApp(t, { redis: true })
  await redis?.stop()
  for (const token of ['short', 'A'.repeat(44), `${'A'.repeat(42)}+`, `${'A'.repeat(42)}B`]) {
    expect401(t, await app.inject({ method: 'POST', url: '/auth/logout', headers: bearer(token) }), token)
  }
  const wellFormed = await app.inject({ method: 'POST', url: '/auth/logout', headers: bearer('A'.repeat(43)) })
  t.equal(wellFormed.statusCode, 503, 'a well-formed token is looked up, and Redis is down')
  t.equal(wellFormed.headers['retry-after'], '1')
  t.equal(wellFormed.json().code, 'SERVICE_UNAVAILABLE')
})

t.test('sessions expire on the injected clock through the app', async (t) => {
  const clock = { at: Date.now() }
  const { app, issuer } = await buildTestApp(t, { now: () => clock.at, env: { SESSION_IDLE_TTL: '10m', SESSION_ABSOLUTE_TTL: '1h' } })
  const token = await signIn(app, issuer)
  clock.at += 9 * 60_000
  t.equal((await app.inject({ url: '/auth/me', headers: bearer(token) })).json().data.authenticated, true)
  clock.at += 9 * 60_000
  t.equal((await app.inject({ url: '/auth/me', headers: bearer(token) })).json().data.authenticated, true, 'slid')
  clock.at += 11 * 60_000
  t.equal((await app.inject({ url: '/auth/me', headers: bearer(token) })).json().data.authenticated, false, 'idle')
})

t.test('a rotated IdP key is accepted after one JWKS refresh', async (t) => {
  const { app, issuer } = await buildTestApp(t)
  await signIn(app, issuer)
  t.equal(issuer.hits.jwks, 1)
  issuer.rotate()
  const response = await app.inject({ method: 'POST', url: '/auth/session', payload: { idToken: await issuer.sign({}, { key: 'rotated' }) } })
  t.equal(response.statusCode, 201)
  t.equal(issuer.hits.jwks, 2)
})

t.test('patient refs are remembered, within a bound, and stay the same', async (t) => {
  const ref = createPatientRef(TEST_API_KEY, 2)
  const first = ['a@example.com', 'b@example.com', 'c@example.com'].map(ref)
  t.equal(new Set(first).size, 3, 'one ref per patient')
  // The third patient emptied the memory: every ref is computed again, and is the same.
  t.same(['a@example.com', 'b@example.com', 'c@example.com'].map(ref), first)
  t.equal(ref('A@example.com'), first[0], 'case-insensitive, remembered or not')
})

t.test('logs carry a keyed patient hash, never the email or a token', async (t) => {
  const lines: string[] = []
  const logStream = new Writable({ write (chunk, _encoding, done) { lines.push(String(chunk)); done() } })
  const { app, issuer } = await buildTestApp(t, { logStream })
  const idToken = await issuer.sign({ email: 'Logged@Example.com' })
  const created = await app.inject({ method: 'POST', url: '/auth/session', payload: { idToken } })
  const token = created.json().data.token as string
  await app.inject({ url: '/auth/me', headers: bearer(token) })
  await app.inject({ method: 'POST', url: '/auth/logout', headers: bearer(token) })
  const all = lines.join('')
  const ref = createPatientRef(TEST_API_KEY)('logged@example.com')
  t.equal(app.patientRef('LOGGED@example.COM'), ref, 'case-insensitive')
  t.match(ref, /^[0-9a-f]{32}$/)
  t.not(createPatientRef('another-key')('logged@example.com'), ref, 'keyed')
  t.ok(all.includes(ref), 'the patient hash is logged')
  t.ok(lines.some((line) => line.includes('"url":"/auth/me"') || line.includes(ref)))
  t.notOk(all.toLowerCase().includes('logged@example.com'), 'no email')
  t.notOk(all.includes(token), 'no session token')
  t.notOk(all.includes(sessionIdOf(token)), 'no session id')
  t.notOk(all.includes(idToken.split('.')[1] as string), 'no ID token')
})

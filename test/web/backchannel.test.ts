import t, { type Test } from 'tap'
import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { generateKeyPair, SignJWT } from 'jose'
import { Browser } from './browser.js'
import { SESSION_COOKIE, startWebStack, type WebStack } from './stack.js'
import { buildTestApp, signIn } from '../helpers/app.js'
import { BACKCHANNEL_LOGOUT_EVENT } from '../../src/web/backchannel.js'
import { createReplayGuard } from '../../src/web/replay-guard.js'
import { startRedis, redisClient } from '../helpers/redis.js'

/** OIDC Back-Channel Logout 1.0: the IdP ends sessions here, on every replica at once. */

const EVENTS = { [BACKCHANNEL_LOGOUT_EVENT]: {} }

async function authenticated (app: WebStack['app'], cookie: string | undefined): Promise<boolean> {
  const answer = await app.inject({ method: 'GET', url: '/auth/me', cookies: { [SESSION_COOKIE]: cookie ?? '' } })
  return (answer.json() as { data: { authenticated: boolean } }).data.authenticated
}

function post (app: WebStack['app'], body: string, contentType = 'application/x-www-form-urlencoded') {
  return app.inject({ method: 'POST', url: '/auth/backchannel-logout', headers: { 'content-type': contentType }, payload: body })
}

const form = (token: string): string => new URLSearchParams({ logout_token: token }).toString()

/** Signs in through the IdP, then signs out at the IdP (not here): the IdP tells us. */
async function signOutAtIdp (stack: WebStack, browser: Browser): Promise<void> {
  const confirm = await browser.navigate(`${stack.idp.url}/session/end`)
  const xsrf = /name="xsrf" value="([^"]+)"/.exec(confirm.text)?.[1] as string
  const action = /action="([^"]+)"/.exec(confirm.text)?.[1] as string
  await browser.navigate(action, { method: 'POST', form: { xsrf, logout: 'yes' } })
}

for (const store of ['memory', 'redis'] as const) {
  t.test(`${store} store: signing out at the IdP kills the live session here`, async (t) => {
    const stack = await startWebStack(t, { redis: store === 'redis' })
    const browser = new Browser()
    await stack.signIn(browser, 'alice@example.com')
    const cookie = stack.sessionOf(browser)
    const other = new Browser()
    await stack.signIn(other, 'alice@example.com')
    t.ok(await authenticated(stack.app, cookie))

    const replica = store === 'redis' ? await buildTestApp(t, { env: stack.env, redis: stack.redis as NonNullable<typeof stack.redis> }) : null
    if (replica !== null) t.ok(await authenticated(replica.app, cookie), 'another replica sees it too')

    await signOutAtIdp(stack, browser)
    t.equal(stack.idp.backchannel.delivered, 1)
    t.notOk(await authenticated(stack.app, cookie), 'ended by the logout token (by sid)')
    if (replica !== null) t.notOk(await authenticated(replica.app, cookie), 'on every replica')
    t.ok(await authenticated(stack.app, stack.sessionOf(other)), "another IdP session of the same user is not this one's")
  })
}

t.test('logout tokens are verified per the spec', async (t) => {
  const stack = await startWebStack(t)
  const { app, idp } = stack
  const alice = new Browser()
  await stack.signIn(alice, 'alice@example.com')
  const aliceCookie = stack.sessionOf(alice)
  const bob = new Browser()
  await stack.signIn(bob, 'bob@example.com')
  const bobBearer = await stack.bearerFor('bob@example.com')

  const { privateKey: foreignKey } = await generateKeyPair('RS256')
  const now = Math.floor(Date.now() / 1000)
  const refusals: Array<[string, () => Promise<string>]> = [
    ['no events', () => stack.signAsIdp({ sub: 'patient-alice' })],
    ['events without the logout event', () => stack.signAsIdp({ sub: 'patient-alice', events: { 'http://example.com/other': {} } })],
    ['logout event not an object', () => stack.signAsIdp({ sub: 'patient-alice', events: { [BACKCHANNEL_LOGOUT_EVENT]: 'yes' } })],
    ['logout event an array', () => stack.signAsIdp({ sub: 'patient-alice', events: { [BACKCHANNEL_LOGOUT_EVENT]: [] } })],
    ['a nonce (an ID token)', () => stack.signAsIdp({ sub: 'patient-alice', events: EVENTS, nonce: 'n' })],
    ['neither sub nor sid', () => stack.signAsIdp({ events: EVENTS })],
    ['another audience', () => stack.signAsIdp({ sub: 'patient-alice', events: EVENTS, aud: 'someone-else' })],
    ['another issuer', () => stack.signAsIdp({ sub: 'patient-alice', events: EVENTS, iss: 'https://evil.example' })],
    ['issued long ago', () => stack.signAsIdp({ sub: 'patient-alice', events: EVENTS, iat: now - 3600, exp: now + 60 })],
    ['expired', () => stack.signAsIdp({ sub: 'patient-alice', events: EVENTS, iat: now - 120, exp: now - 60 })],
    // Dated ahead (a fast IdP clock): it would outlive the replay guard's memory of its jti.
    ['issued in the future', () => stack.signAsIdp({ sub: 'patient-alice', events: EVENTS, iat: now + 180, exp: now + 600 })],
    ['a typ that is no string', () => stack.signAsIdp({ sub: 'patient-alice', events: EVENTS }, { typ: 42 })],
    ['no jti', () => stack.signAsIdp({ sub: 'patient-alice', events: EVENTS, jti: undefined })],
    ['a jti that is no string', () => stack.signAsIdp({ sub: 'patient-alice', events: EVENTS, jti: 42 })],
    ['typed as an access token', () => stack.signAsIdp({ sub: 'patient-alice', events: EVENTS }, { typ: 'at+jwt' })],
    ['signed by a key the IdP never published', () => stack.signAsIdp({ sub: 'patient-alice', events: EVENTS }, { kid: 'nope' })],
    ['signed with another key under the IdP kid', async () => await new SignJWT({ iss: idp.url, aud: idp.clientId, iat: now, jti: 'j', sub: 'patient-alice', events: EVENTS }).setProtectedHeader({ alg: 'RS256', kid: idp.signingKeys[0]?.kid as string }).sign(foreignKey)],
    ['HMAC', async () => await new SignJWT({ iss: idp.url, aud: idp.clientId, iat: now, jti: 'j', sub: 'patient-alice', events: EVENTS }).setProtectedHeader({ alg: 'HS256' }).sign(new TextEncoder().encode('x'.repeat(32)))],
    ['garbage', async () => 'not.a.jwt']
  ]
  for (const [name, make] of refusals) {
    const answer = await post(app, form(await make()))
    t.equal(answer.statusCode, 400, `${name} → 400`)
    t.match(answer.json(), { code: 'VALIDATION_FAILED', error: 'invalid_request' })
    t.equal(answer.headers['cache-control'], 'no-store')
  }
  for (const [name, body] of [['no body', ''], ['no logout_token', 'a=1'], ['two logout_tokens', 'logout_token=a&logout_token=b'], ['an oversized token', form('x'.repeat(9000))]] as const) {
    const answer = await post(app, body)
    t.equal(answer.statusCode, 400, `${name} → 400`)
  }
  t.equal((await app.inject({ method: 'POST', url: '/auth/backchannel-logout' })).statusCode, 400, 'no content at all → 400')
  t.equal((await post(app, 'x', 'text/plain')).statusCode, 415, 'only form-encoded (or JSON) bodies')
  t.equal((await app.inject({ method: 'POST', url: '/auth/session', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: 'idToken=x' })).statusCode, 415, 'form bodies on this route only')
  t.ok(await authenticated(app, aliceCookie), 'none of that ended a session')

  // By subject: every session of that user at this issuer, web and mobile alike.
  const bySubject = await stack.signAsIdp({ sub: 'patient-bob', events: EVENTS }, { typ: 'logout+jwt' })
  const ended = await post(app, form(bySubject))
  t.equal(ended.statusCode, 200)
  t.equal(ended.headers['cache-control'], 'no-store')
  t.notOk(await authenticated(app, stack.sessionOf(bob)), "bob's web session ended")
  t.ok(await authenticated(app, aliceCookie), "alice's did not")
  t.equal((await app.inject({ method: 'GET', url: '/auth/me', headers: { authorization: `Bearer ${bobBearer}` } })).json().data.authenticated, true, 'a mobile session under another subject stays')

  const replayed = await post(app, form(bySubject))
  t.equal(replayed.statusCode, 400, 'a replayed logout token (same jti) is refused')

  const unknownSid = await post(app, form(await stack.signAsIdp({ sid: 'no-such-sid', events: EVENTS })))
  t.equal(unknownSid.statusCode, 200, 'naming no session is still a valid logout')

  // A provider following the final text of 2022 sends no `exp` (errata set 1 added it): its
  // logouts still end sessions, bounded by `iat` and the jti guard.
  const withoutExp = await post(app, form(await stack.signAsIdp({ sub: 'patient-alice', events: EVENTS, exp: undefined })))
  t.equal(withoutExp.statusCode, 200, 'a logout token without exp is a valid logout')
  t.notOk(await authenticated(app, aliceCookie), "alice's web session ended")
})

t.test('an IdP that sends no sid: its logout tokens end the sessions by subject', async (t) => {
  const stack = await startWebStack(t, { noSid: true })
  const browser = new Browser()
  await stack.signIn(browser, 'alice@example.com')
  const cookie = stack.sessionOf(browser)
  t.ok(await authenticated(stack.app, cookie))
  await signOutAtIdp(stack, browser)
  t.equal(stack.idp.backchannel.delivered, 1)
  t.notOk(await authenticated(stack.app, cookie))
})

t.test('Redis down: 503, and the IdP sees the failure', async (t) => {
  const stack = await startWebStack(t, { redis: true })
  const browser = new Browser()
  await stack.signIn(browser, 'alice@example.com')
  await stack.redis?.stop()
  const answer = await post(stack.app, form(await stack.signAsIdp({ sub: 'patient-alice', events: EVENTS })))
  t.equal(answer.statusCode, 503)
  await signOutAtIdp(stack, browser)
  t.equal(stack.idp.backchannel.failed, 1)
})

t.test('IdP unreachable: discovery or JWKS → 503', async (t) => {
  const stack = await startWebStack(t)
  const token = await stack.signAsIdp({ sub: 'patient-alice', events: EVENTS })
  // A replica with an injected clock (the clock reaches the logout token checks and the replay guard).
  const fresh = await buildTestApp(t, { env: stack.env, now: () => Date.now() })
  await stack.app.issuerKeys.resolve() // discovery done, JWKS not yet fetched
  await stack.idp.close()
  t.equal((await post(stack.app, form(token))).statusCode, 503, 'JWKS unreachable')
  t.equal((await post(fresh.app, form(token))).statusCode, 503, 'discovery unreachable')
})

t.test('logout tokens and mobile ID tokens share one key set: a rotated IdP key costs one JWKS fetch', async (t) => {
  // The web client configured against the local issuer, which counts its discovery and JWKS requests.
  const { app, issuer } = await buildTestApp(t, { env: { OIDC_CLIENT_SECRET: 'test-web-client-secret-0123456789', PUBLIC_URL: 'https://patient.example' } })
  const bearer = await signIn(app, issuer)
  t.same(issuer.hits, { discovery: 1, jwks: 1 })
  const me = async (token: string) => (await app.inject({ url: '/auth/me', headers: { authorization: `Bearer ${token}` } })).json().data.authenticated as boolean
  t.ok(await me(bearer))

  issuer.rotate()
  const logoutToken = await issuer.sign({ sub: 'sub-patient@example.com', events: EVENTS, jti: randomUUID() }, { key: 'rotated' })
  t.equal((await post(app, form(logoutToken))).statusCode, 200, 'a logout token under the new key')
  t.notOk(await me(bearer), 'ended the mobile session of that subject')
  t.same(issuer.hits, { discovery: 1, jwks: 2 }, 'after one refetch, by the logout verifier')

  // A sign-in after that logout (a later second: one in the logout's own second is refused).
  const idToken = await issuer.sign({ sub: 'sub-patient@example.com', auth_time: Math.floor(Date.now() / 1000) + 1 }, { key: 'rotated' })
  t.equal((await app.inject({ method: 'POST', url: '/auth/session', payload: { idToken } })).statusCode, 201, 'a mobile sign-in under the new key')
  t.same(issuer.hits, { discovery: 1, jwks: 2 }, 'with no discovery or JWKS fetch of its own')
})

t.test('replay guard in memory stays bounded', async (t) => {
  let now = 0
  const guard = createReplayGuard({ redis: null }, () => now)
  t.equal(await guard.claim('a', 1000), true)
  await guard.markUsed('a')
  t.equal(await guard.claim('a', 1000), false)
  now = 1000
  t.equal(await guard.claim('a', 1000), true, 'forgotten once expired')
  for (let i = 0; i < 10_000; i++) await guard.claim(`fill-${i}`, 10)
  now = 2000
  t.equal(await guard.claim('after-sweep', 1000), true, 'expired ids swept when full')
  for (let i = 0; i < 10_000; i++) await guard.claim(`fresh-${i}`, 100_000)
  t.equal(await guard.claim('overflow', 1000), true, 'the oldest dropped when full of live ids')

  // Full of expired ids and one used live one: the sweep takes the expired, and the used id stays a
  // replay (kills dropping the sweep, which would drop the oldest: the used id).
  now = 0
  const swept = createReplayGuard({ redis: null }, () => now)
  t.equal(await swept.claim('used-early', 1_000_000), true)
  await swept.markUsed('used-early')
  for (let i = 0; i < 9_999; i++) await swept.claim(`short-${i}`, 10)
  now = 100
  t.equal(await swept.claim('new', 1000), true)
  t.equal(await swept.claim('used-early', 1_000_000), false, 'still a replay')

  // Full of live ids: the oldest goes (bounded memory), so its replay would pass (kills dropping
  // the eviction, which lets the memory grow without bound).
  const flooded = createReplayGuard({ redis: null }, () => now)
  await flooded.claim('first', 1_000_000)
  await flooded.markUsed('first')
  for (let i = 0; i < 10_000; i++) await flooded.claim(`live-${i}`, 1_000_000)
  t.equal(await flooded.used('first'), false, 'the oldest forgotten once 10 000 newer ids came')
})

for (const store of ['memory', 'redis'] as const) {
  t.test(`${store} replay guard: a claim that was never used is claimed again; a used one is a replay until it expires`, async (t) => {
    let now = 0
    const redisServer = store === 'redis' ? await startRedis(t) : null
    const redis = redisServer === null ? null : redisClient(redisServer.url)
    t.teardown(() => redis?.disconnect())
    const guard = createReplayGuard({ redis }, () => now)
    t.equal(await guard.claim('a', 300), true, 'first use')
    t.equal(await guard.claim('a', 300), true, 'claimed, not used: a retry goes on')
    await guard.markUsed('a')
    t.equal(await guard.claim('a', 300), false, 'used: a replay')
    t.equal(await guard.claim('b', 300), true, 'another id is its own')
    // Past the time to live (Redis's own clock for Redis).
    now = 400
    if (redis !== null) await sleep(400)
    t.equal(await guard.claim('a', 300), true, 'forgotten once expired')
    now = 800
    if (redis !== null) await sleep(400)
    await guard.markUsed('a')
    t.equal(await guard.claim('a', 300), true, 'marking an expired claim used does not bring it back')

    // `used` is a look: true only for a use that completed and has not expired (kills `used`
    // reading any claim as used, for Redis, and ignoring the expiry, for memory: replay-guard.ts).
    t.equal(await guard.used('c'), false, 'never claimed')
    t.equal(await guard.claim('c', 300), true)
    t.equal(await guard.used('c'), false, 'claimed, not used')
    await guard.markUsed('c')
    t.equal(await guard.used('c'), true, 'used')
    now += 400
    if (redis !== null) await sleep(400)
    t.equal(await guard.used('c'), false, 'forgotten once expired')
  })
}

t.test('Redis fails while the sessions are ended: 503, and the IdP\'s retry of the same token is carried out', async (t) => {
  const stack = await startWebStack(t, { redis: true })
  const browser = new Browser()
  await stack.signIn(browser, 'alice@example.com')
  const cookie = stack.sessionOf(browser)
  const admin = redisClient((stack.redis as NonNullable<typeof stack.redis>).url)
  t.teardown(async () => {
    await admin.call('ACL', 'SETUSER', 'default', '+zrange', '+set').catch(() => {})
    admin.disconnect()
  })
  const token = await stack.signAsIdp({ sub: 'patient-alice', events: EVENTS })

  // The store refuses the revoke's ZRANGE (an ACL), after the token's id was claimed.
  await admin.call('ACL', 'SETUSER', 'default', '-zrange')
  t.equal((await post(stack.app, form(token))).statusCode, 503, 'the IdP is told to retry')
  t.ok(await authenticated(stack.app, cookie), 'the session still stands')

  // The retry of the same token, once the store answers again: not a replay. Marking the id used
  // fails this time (SET refused), which the logout itself does not depend on.
  await admin.call('ACL', 'SETUSER', 'default', '+zrange', '-set')
  const retried = await post(stack.app, form(token))
  t.equal(retried.statusCode, 200, 'the retry is carried out')
  t.notOk(await authenticated(stack.app, cookie), 'the session is ended')

  await admin.call('ACL', 'SETUSER', 'default', '+set')
  t.equal((await post(stack.app, form(token))).statusCode, 200, 'never marked used: the same token is carried out again')
  t.equal((await post(stack.app, form(token))).statusCode, 400, 'marked used that time: now a replay')
})

/** The web client on the local issuer: the back-channel route exists, mobile ID tokens come from `issuer.sign`. */
const WEB_CLIENT = { OIDC_CLIENT_SECRET: 'test-web-client-secret-0123456789', PUBLIC_URL: 'https://patient.example' }

function exchange (app: WebStack['app'], idToken: string) {
  return app.inject({ method: 'POST', url: '/auth/session', payload: { idToken } })
}

async function bearerAuthenticated (app: WebStack['app'], token: string): Promise<boolean> {
  return (await app.inject({ url: '/auth/me', headers: { authorization: `Bearer ${token}` } })).json().data.authenticated as boolean
}

/**
 * The store refuses every key of the logouts' marks (`bff:logout:`), and only those: an ACL whose
 * key patterns allow every other name (Redis patterns have no negation, so character by character).
 */
const ALL_BUT_LOGOUT_MARKS = ['~[^b]*', '~b[^f]*', '~bf[^f]*', '~bff[^:]*', '~bff:[^l]*', '~bff:l[^o]*']

async function storeAdmin (t: Test, url: string) {
  const admin = redisClient(url)
  t.teardown(async () => {
    await admin.call('ACL', 'SETUSER', 'default', 'resetkeys', '~*').catch(() => {})
    admin.disconnect()
  })
  return {
    refuseLogoutMarks: async () => { await admin.call('ACL', 'SETUSER', 'default', 'resetkeys', ...ALL_BUT_LOGOUT_MARKS) },
    restore: async () => { await admin.call('ACL', 'SETUSER', 'default', 'resetkeys', '~*') }
  }
}

for (const store of ['memory', 'redis'] as const) {
  t.test(`${store} store: after a back-channel logout, the ID token of the ended IdP session mints no new session`, async (t) => {
    const { app, issuer, redis } = await buildTestApp(t, { redis: store === 'redis', env: WEB_CLIENT })
    const idToken = await issuer.sign({ sid: 'idp-sid-1' })
    const first = await exchange(app, idToken)
    t.equal(first.statusCode, 201)
    const bearer = first.json().data.token as string

    const logout = await post(app, form(await issuer.sign({ sid: 'idp-sid-1', events: EVENTS, jti: randomUUID(), email: undefined, email_verified: undefined })))
    t.equal(logout.statusCode, 200)
    t.notOk(await bearerAuthenticated(app, bearer), 'the session is ended')

    // The app's retry on its 401 with the ID token it cached, or a stolen copy of it.
    const again = await exchange(app, idToken)
    t.equal(again.statusCode, 401, 'the same ID token is refused')
    t.match(again.json(), { status: 401, code: 'SESSION_REQUIRED', message: 'Invalid ID token' })
    t.equal((await exchange(app, await issuer.sign({ sid: 'idp-sid-1' }))).statusCode, 401, 'so is any token of that IdP session')
    t.equal((await exchange(app, await issuer.sign({ sid: 'idp-sid-2' }))).statusCode, 201, 'another IdP session of the patient signs in')

    if (redis !== undefined) {
      const replica = await buildTestApp(t, { redis, env: { ...WEB_CLIENT, OIDC_ISSUER: issuer.url } })
      t.equal((await exchange(replica.app, idToken)).statusCode, 401, 'on every replica')
      t.same(await (async () => {
        const admin = redisClient(redis.url)
        t.teardown(() => admin.disconnect())
        return (await admin.keys('bff:logout:*')).filter((key) => key.includes('idp-sid-1'))
      })(), [], 'the mark is named by a hash, never the sid')
    }
  })
}

t.test('a back-channel logout by subject: a token signed in before it mints no session, a sign-in after it does', async (t) => {
  const { app, issuer } = await buildTestApp(t, { env: WEB_CLIENT })
  const nowSec = Math.floor(Date.now() / 1000)
  const cached = await issuer.sign({ auth_time: nowSec - 60 })
  t.equal((await exchange(app, cached)).statusCode, 201)
  t.equal((await exchange(app, cached)).statusCode, 201, 'exchanged again while no logout came')

  const logout = await issuer.sign({ events: EVENTS, jti: randomUUID(), iat: nowSec, email: undefined, email_verified: undefined })
  t.equal((await post(app, form(logout))).statusCode, 200)
  t.equal((await exchange(app, cached)).statusCode, 401, 'signed in before the logout')
  t.equal((await exchange(app, await issuer.sign({ auth_time: nowSec }))).statusCode, 401, 'in its very second')
  t.equal((await exchange(app, await issuer.sign({ auth_time: nowSec + 1 }))).statusCode, 201, 'a fresh sign-in after it')
  t.equal((await exchange(app, await issuer.sign({ sub: 'another-patient', auth_time: nowSec - 60 }))).statusCode, 201, 'another patient')
})

t.test('a back-channel logout delivered late is dated by its iat: a sign-in between the IdP\'s logout and the delivery mints a session', async (t) => {
  const { app, issuer } = await buildTestApp(t, { env: WEB_CLIENT })
  const nowSec = Math.floor(Date.now() / 1000)
  // The IdP ended the session two minutes ago; its logout token arrives only now (retried).
  const logout = await issuer.sign({ events: EVENTS, jti: randomUUID(), iat: nowSec - 120, email: undefined, email_verified: undefined })
  t.equal((await post(app, form(logout))).statusCode, 200)
  t.equal((await exchange(app, await issuer.sign({ auth_time: nowSec - 180 }))).statusCode, 401, 'signed in before the logout')
  t.equal((await exchange(app, await issuer.sign({ auth_time: nowSec - 60 }))).statusCode, 201, 'signed in again at the IdP after it, before its token came')
})

t.test('the logouts\' marks unreachable: sign-in and back-channel logout answer 503; the IdP\'s retry is carried out', async (t) => {
  const { app, issuer, redis } = await buildTestApp(t, { redis: true, env: WEB_CLIENT })
  const admin = await storeAdmin(t, (redis as NonNullable<typeof redis>).url)
  const idToken = await issuer.sign({ sid: 'idp-sid-1' })
  const bearer = (await exchange(app, idToken)).json().data.token as string

  await admin.refuseLogoutMarks()
  const signIn = await exchange(app, idToken)
  t.equal(signIn.statusCode, 503, 'a sign-in the marks cannot clear is not let through')
  t.equal(signIn.json().code, 'SERVICE_UNAVAILABLE')
  const logoutToken = await issuer.sign({ sid: 'idp-sid-1', events: EVENTS, jti: randomUUID(), email: undefined, email_verified: undefined })
  t.equal((await post(app, form(logoutToken))).statusCode, 503, 'the IdP is told to retry')
  t.ok(await bearerAuthenticated(app, bearer), 'nothing ended halfway')

  await admin.restore()
  t.equal((await post(app, form(logoutToken))).statusCode, 200, 'the retry of the same token is carried out')
  t.notOk(await bearerAuthenticated(app, bearer))
  t.equal((await exchange(app, idToken)).statusCode, 401)
})

/** Follows a web sign-in up to the callback URL, without visiting it, whether the IdP asks who signs in or not. */
async function callbackOf (stack: WebStack, browser: Browser, email: string): Promise<string> {
  let response = await browser.fetch(`${stack.publicUrl}/auth/login`)
  for (let hops = 0; hops < 10; hops++) {
    const location = response.headers.get('location')
    if (location === null) {
      // The IdP's account page: this browser has no IdP session yet.
      const page = await response.text()
      const action = /action="([^"]+)"/.exec(page)?.[1] as string
      response = await browser.fetch(new URL(action, stack.idp.url).href, { method: 'POST', form: { account: email } })
      continue
    }
    const next = new URL(location, stack.idp.url).href
    if (next.startsWith(`${stack.publicUrl}/auth/callback`)) return next
    response = await browser.fetch(next)
  }
  throw new Error('no callback')
}

for (const store of ['memory', 'redis'] as const) {
  t.test(`${store} store: a web sign-in in flight during a back-channel logout gets no session`, async (t) => {
    const stack = await startWebStack(t, { redis: store === 'redis' })
    const browser = new Browser()
    await stack.signIn(browser, 'alice@example.com')
    const sid = (await stack.app.sessions.get(stack.sessionOf(browser) as string))?.idpSessionId as string
    t.type(sid, 'string')

    // By IdP session: a second sign-in of the same browser (the same IdP session) is on its way back
    // when the IdP ends that session.
    const inFlight = await callbackOf(stack, browser, 'alice@example.com')
    t.equal((await post(stack.app, form(await stack.signAsIdp({ sid, events: EVENTS })))).statusCode, 200)
    const refused = await browser.fetch(inFlight)
    t.equal(refused.status, 302)
    t.equal(refused.headers.get('location'), `${stack.publicUrl}/?signin_error=login_expired`)
    t.notOk(refused.headers.getSetCookie().some((line) => line.startsWith(`${SESSION_COOKIE}=`)), 'no session cookie')
    t.notOk(await authenticated(stack.app, stack.sessionOf(browser)), 'and the first sign-in\'s session ended by the logout')

    // By subject: another browser's sign-in, and the IdP ends every session of the patient. This
    // IdP sends auth_time only when asked (max_age): the ID token is dated by its iat, the time of
    // the code exchange, which comes a second after the logout here; the sign-in began before it.
    const other = new Browser()
    const url = await callbackOf(stack, other, 'bob@example.com')
    const logoutAt = Math.floor(Date.now() / 1000)
    t.equal((await post(stack.app, form(await stack.signAsIdp({ sub: 'patient-bob', events: EVENTS, iat: logoutAt })))).statusCode, 200)
    await sleep((logoutAt + 1) * 1000 + 20 - Date.now())
    t.equal((await other.fetch(url)).headers.get('location'), `${stack.publicUrl}/?signin_error=login_expired`)
    t.equal(stack.sessionOf(other), undefined)

    // A sign-in after the logout (a new IdP session, a later second) is not affected.
    await sleep(logoutAt * 1000 + 1020 - Date.now())
    const fresh = new Browser()
    await stack.signIn(fresh, 'bob@example.com')
    t.ok(await authenticated(stack.app, stack.sessionOf(fresh)))
  })
}

t.test('the logouts\' marks unreachable at the callback: session_unavailable, no session', async (t) => {
  const stack = await startWebStack(t, { redis: true })
  const admin = await storeAdmin(t, (stack.redis as NonNullable<typeof stack.redis>).url)
  const browser = new Browser()
  const url = await callbackOf(stack, browser, 'alice@example.com')
  await admin.refuseLogoutMarks()
  const page = await browser.fetch(url)
  t.equal(page.status, 302)
  t.equal(page.headers.get('location'), `${stack.publicUrl}/?signin_error=session_unavailable`)
  t.equal(stack.sessionOf(browser), undefined)
})

for (const store of ['memory', 'redis'] as const) {
  t.test(`${store} store: RATE_LIMIT_IP counts only refused logout tokens, on a counter of their own`, async (t) => {
    const stack = await startWebStack(t, { redis: store === 'redis', env: { RATE_LIMIT_IP: '3/1m' } })
    const { app } = stack
    const valid = async () => await post(app, form(await stack.signAsIdp({ sub: 'patient-alice', events: EVENTS })))

    // An identity provider ending many sessions from one address: none is dropped.
    for (let i = 1; i <= 5; i++) {
      const answer = await valid()
      t.equal(answer.statusCode, 200, `valid logout ${i} of 5 over a limit of 3 → 200`)
      t.equal(answer.headers.ratelimit, '"ip";r=2;t=60', 'what is left: refusals, none used')
      t.equal(answer.headers['ratelimit-policy'], '"ip";q=3;w=60')
    }
    for (let i = 1; i <= 3; i++) t.equal((await post(app, form('not.a.jwt'))).statusCode, 400, `refused token ${i} → 400, counted`)
    t.equal((await app.inject({ method: 'GET', url: '/auth/me' })).statusCode, 200, "the address's other requests have their own count")

    const over = await valid()
    t.equal(over.statusCode, 429, 'refusals at the limit: everything from that address is refused until the window ends')
    t.match(over.json(), { status: 429, success: false, code: 'RATE_LIMITED' })
    t.ok(Number(over.headers['retry-after']) > 0 && Number(over.headers['retry-after']) <= 60)
    t.equal(over.headers.ratelimit, `"ip";r=0;t=${over.headers['retry-after'] as string}`)
    t.equal((await post(app, form('not.a.jwt'))).statusCode, 429, 'a refused one too, before verification')

    const other = await app.inject({ method: 'POST', url: '/auth/backchannel-logout', remoteAddress: '10.0.0.9', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: form('not.a.jwt') })
    t.equal(other.statusCode, 400, 'another address is counted apart')

    // Valid logouts arriving all at once, beyond the limit, from an address with refusals: none
    // is counted, so all get through.
    const fromIdp = { remoteAddress: '10.0.0.10', headers: { 'content-type': 'application/x-www-form-urlencoded' } }
    t.equal((await app.inject({ method: 'POST', url: '/auth/backchannel-logout', ...fromIdp, payload: form('not.a.jwt') })).statusCode, 400)
    const tokens = await Promise.all(Array.from({ length: 8 }, async () => await stack.signAsIdp({ sub: 'patient-alice', events: EVENTS })))
    const together = await Promise.all(tokens.map(async (token) => (await app.inject({ method: 'POST', url: '/auth/backchannel-logout', ...fromIdp, payload: form(token) })).statusCode))
    t.same(together, Array(8).fill(200), 'valid logouts together all get through')
    // Garbage arriving all at once is verified (known limit), and counted: the next is refused.
    const garbage = await Promise.all(Array.from({ length: 6 }, async () => (await app.inject({ method: 'POST', url: '/auth/backchannel-logout', ...fromIdp, payload: form('not.a.jwt') })).statusCode))
    t.ok(garbage.every((status) => status === 400 || status === 429), `refused: ${garbage.join(',')}`)
    t.equal((await app.inject({ method: 'POST', url: '/auth/backchannel-logout', ...fromIdp, payload: form(tokens[0] as string) })).statusCode, 429, 'then the address is refused')
    // The route by whatever spelling reaches it; other methods on its path are any request.
    const encoded = async () => (await app.inject({ method: 'POST', url: '/auth/backchannel%2Dlogout', remoteAddress: '10.0.0.11', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: form(await stack.signAsIdp({ sub: 'patient-alice', events: EVENTS })) })).statusCode
    t.same([await encoded(), await encoded(), await encoded(), await encoded()], [200, 200, 200, 200], 'valid logouts to an encoded path are the route\'s, never counted')
    const gets = []
    for (let i = 0; i < 4; i++) gets.push((await app.inject({ method: 'GET', url: '/auth/backchannel-logout', remoteAddress: '10.0.0.12' })).statusCode)
    t.same(gets, [404, 404, 404, 429], 'a GET of the path is no logout: counted as any request')
  })
}

t.test('Redis down: refused logout tokens are counted in memory, and the limit holds', async (t) => {
  const stack = await startWebStack(t, { redis: true, env: { RATE_LIMIT_IP: '2/1m' } })
  await post(stack.app, form('not.a.jwt'))
  await stack.redis?.stop()
  t.equal((await post(stack.app, form('not.a.jwt'))).statusCode, 400, 'the first counted in Redis, this one in memory')
  t.equal((await post(stack.app, form('not.a.jwt'))).statusCode, 400)
  t.equal((await post(stack.app, form('not.a.jwt'))).statusCode, 429, 'two refusals in memory: the limit')
})

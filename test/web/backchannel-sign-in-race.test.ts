import t from 'tap'
import { randomUUID } from 'node:crypto'
import { buildTestApp, type TestApp } from '../helpers/app.js'
import { startRedis } from '../helpers/redis.js'
import { freePort } from '../helpers/ports.js'
import { BACKCHANNEL_LOGOUT_EVENT } from '../../src/web/backchannel.js'
import { Browser } from './browser.js'
import { SESSION_COOKIE, startWebStack } from './stack.js'

/**
 * A back-channel logout that lands while a sign-in is between its check of the logout marks and
 * the creation of its session: two replicas on one Redis, the sign-in on one, the logout on the
 * other, the sign-in's session creation held until the logout has answered. The logout must win
 * (README, Sessions and sign-in: "a sign-in still in flight cannot undo the logout").
 */

const EVENTS = { [BACKCHANNEL_LOGOUT_EVENT]: {} }

/**
 * Holds every `sessions.create` of `app` until `release()`; `held` resolves when one is waiting;
 * `made` gets the token of each session created.
 */
function holdCreates (app: TestApp['app']): { held: Promise<void>, release: () => void, made: string[] } {
  const create = app.sessions.create.bind(app.sessions)
  let reached!: () => void
  const held = new Promise<void>((resolve) => { reached = resolve })
  let release!: () => void
  const gate = new Promise<void>((resolve) => { release = resolve })
  const made: string[] = []
  app.sessions.create = async function heldCreate (input) {
    reached()
    await gate
    const created = await create(input)
    made.push(created.token)
    return created
  }
  return { held, release, made }
}

function withTimeout<T> (promise: Promise<T>, what: string): Promise<T> {
  return Promise.race([promise, new Promise<never>((_resolve, reject) => setTimeout(() => { reject(new Error(`timed out: ${what}`)) }, 5000).unref())])
}

const form = (token: string): string => new URLSearchParams({ logout_token: token }).toString()

t.test('mobile sign-in on one replica, back-channel logout on another meanwhile: no session outlives the logout', async (t) => {
  const redis = await startRedis(t)
  const env = { OIDC_CLIENT_SECRET: 'web-client-secret-for-the-race-test', PUBLIC_URL: `http://127.0.0.1:${await freePort()}` }
  const one = await buildTestApp(t, { redis, env })
  const two = await buildTestApp(t, { redis, env: { ...env, OIDC_ISSUER: one.issuer.url } })

  // By sid alone, by sid with its subject (as oidc-provider sends them), by subject alone.
  for (const by of ['sid', 'sid and sub', 'sub'] as const) {
    const sid = `idp-session-${randomUUID()}`
    const sub = `subject-${randomUUID()}`
    const idToken = await one.issuer.sign({ sub, sid, email: 'race@example.com', jti: randomUUID() })
    const { held, release } = holdCreates(one.app)
    const signingIn = one.app.inject({ method: 'POST', url: '/auth/session', payload: { idToken } })
    await withTimeout(held, 'the sign-in reaching its session creation')

    const named = by === 'sid' ? { sid, sub: undefined } : by === 'sub' ? { sub } : { sid, sub }
    const logoutToken = await one.issuer.sign({ ...named, events: EVENTS, jti: randomUUID(), email: undefined, email_verified: undefined })
    const logout = await two.app.inject({ method: 'POST', url: '/auth/backchannel-logout', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: form(logoutToken) })
    t.equal(logout.statusCode, 200, `the logout (by ${by}) is carried out`)

    release()
    const answer = await withTimeout(signingIn, 'the sign-in')
    if (answer.statusCode === 201) {
      const token = (answer.json() as { data: { token: string } }).data.token
      for (const replica of [one, two]) {
        const me = await replica.app.inject({ method: 'GET', url: '/auth/me', headers: { authorization: `Bearer ${token}` } })
        t.equal(me.json().data.authenticated, false, `by ${by}: the session made during the logout is ended`)
      }
    } else {
      t.equal(answer.statusCode, 401, `by ${by}: the sign-in is refused`)
    }
  }
})

t.test('one process without Redis: the same interleaving, the same outcome', async (t) => {
  const env = { OIDC_CLIENT_SECRET: 'web-client-secret-for-the-race-test', PUBLIC_URL: `http://127.0.0.1:${await freePort()}`, LOG_LEVEL: 'debug' }
  const lines: string[] = []
  const { app, issuer } = await buildTestApp(t, { env, logStream: { write (line: string) { lines.push(line) } } })
  const sub = `subject-${randomUUID()}`
  const idToken = await issuer.sign({ sub, email: 'race@example.com', jti: randomUUID() })
  const { held, release, made } = holdCreates(app)
  const signingIn = app.inject({ method: 'POST', url: '/auth/session', payload: { idToken } })
  await withTimeout(held, 'the sign-in reaching its session creation')
  const logoutToken = await issuer.sign({ sub, events: EVENTS, jti: randomUUID(), email: undefined, email_verified: undefined })
  const logout = await app.inject({ method: 'POST', url: '/auth/backchannel-logout', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: form(logoutToken) })
  t.equal(logout.statusCode, 200, 'the logout is carried out')
  release()
  const answer = await withTimeout(signingIn, 'the sign-in')
  t.equal(answer.statusCode, 401, 'the sign-in is refused')
  t.equal(lines.filter((line) => line.includes('"msg":"ID token refused"') && line.includes('"refusal":"logged_out"')).length, 1,
    'its refusal logged as one at the verifier\'s own look is')
  // The session it had made before its second look is ended, not left in the store.
  t.equal(made.length, 1, 'one session was made')
  for (const token of made) {
    const me = await app.inject({ method: 'GET', url: '/auth/me', headers: { authorization: `Bearer ${token}` } })
    t.equal(me.json().data.authenticated, false, 'the session made during the logout is ended')
  }
})

t.test('web sign-in callback on one replica, back-channel logout on another meanwhile: no session outlives the logout', async (t) => {
  const stack = await startWebStack(t, { redis: true })
  const other = await buildTestApp(t, { env: stack.env, redis: stack.redis as NonNullable<typeof stack.redis> })
  const browser = new Browser()
  const callback = await stack.callbackUrl(browser, 'alice@example.com')

  const { held, release } = holdCreates(stack.app)
  const finishing = browser.fetch(callback)
  await withTimeout(held, 'the callback reaching its session creation')
  // The IdP ends alice's sessions (by subject: the session the sign-in makes is hers).
  const logoutToken = await stack.signAsIdp({ sub: 'patient-alice', events: EVENTS })
  const logout = await other.app.inject({ method: 'POST', url: '/auth/backchannel-logout', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: form(logoutToken) })
  t.equal(logout.statusCode, 200, 'the logout is carried out')

  release()
  const finished = await withTimeout(finishing, 'the callback')
  t.equal(finished.status, 302)
  const cookie = stack.sessionOf(browser)
  if (cookie === undefined) {
    t.match(finished.headers.get('location'), /signin_error=login_expired/, 'the sign-in ends as expired')
  } else {
    for (const app of [stack.app, other.app]) {
      const me = await app.inject({ method: 'GET', url: '/auth/me', cookies: { [SESSION_COOKIE]: cookie } })
      t.equal(me.json().data.authenticated, false, 'the session made during the logout is ended')
    }
  }
})

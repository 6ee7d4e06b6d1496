import { setTimeout as sleep } from 'node:timers/promises'
import t from 'tap'
import type { LightMyRequestResponse } from 'fastify'
import { buildTestApp, signIn } from '../helpers/app.js'
import { Browser } from '../web/browser.js'
import { SESSION_COOKIE, startWebStack } from '../web/stack.js'

/**
 * `GET /auth/me?slide=false` answers as `/auth/me` does but leaves the session's idle expiry where
 * it is: a web app's session monitor polls it to show when the patient will be signed out, and a
 * poll that slid the expiry would keep an unattended session alive up to its absolute lifetime.
 * Duende BFF's `/bff/user?slide=false` is the model.
 */

const bearer = (token: string) => ({ authorization: `Bearer ${token}` })
interface Me { authenticated: boolean, expiresAt?: string }
const APP_ORIGIN = 'https://app.example.com'
const FROM_APP = { origin: APP_ORIGIN, 'sec-fetch-site': 'same-site', 'sec-fetch-mode': 'cors', 'sec-fetch-dest': 'empty' }

for (const redis of [false, true]) {
  const store = redis ? 'Redis' : 'memory'

  t.test(`a poll with slide=false lets the session idle out; a poll without it keeps it alive (${store})`, async (t) => {
    // 3 s idle: a lookup slides the expiry once the session was last seen 300 ms ago or more. The
    // polls come 1 s apart, with 1 s to spare before the expiry on a loaded machine.
    const { app, issuer } = await buildTestApp(t, { redis, env: { SESSION_IDLE_TTL: '3s', SESSION_ABSOLUTE_TTL: '1h' } })
    const watched = await signIn(app, issuer, 'watched@example.com')
    const used = await signIn(app, issuer, 'used@example.com')
    const signedInAt = Date.now()
    const me = async (token: string, query: string): Promise<Me> => {
      const response = await app.inject({ url: `/auth/me${query}`, headers: bearer(token) })
      t.equal(response.statusCode, 200)
      return (response.json() as { data: Me }).data
    }
    const expiresAt = (await me(watched, '?slide=false')).expiresAt
    t.ok(expiresAt !== undefined && Math.abs(Date.parse(expiresAt) - (signedInAt + 3000)) < 1000, 'the expiry the sign-in set')

    for (const at of [1000, 2000]) {
      await sleep(Math.max(0, signedInAt + at - Date.now()))
      t.same(await me(watched, '?slide=false'), { authenticated: true, email: 'watched@example.com', expiresAt }, `at +${at} ms: the same expiry, unmoved`)
      const slid = await me(used, '')
      t.ok(slid.expiresAt !== undefined && Date.parse(slid.expiresAt) > Date.parse(expiresAt as string), `at +${at} ms: a poll without slide=false moves the expiry`)
    }
    // Past the idle lifetime after the sign-in, the watched session's last use.
    await sleep(Math.max(0, signedInAt + 3600 - Date.now()))
    t.same(await me(watched, '?slide=false'), { authenticated: false }, 'the watched session idled out')
    t.equal((await me(used, '?slide=true')).authenticated, true, 'the other one, polled without slide=false, is alive')
  })
}

t.test('slide takes true or false; anything else is a 400 in the envelope, other query parameters are left alone', async (t) => {
  const { app, issuer } = await buildTestApp(t)
  const token = await signIn(app, issuer)
  for (const query of ['?slide=no', '?slide=', '?slide=FALSE', '?slide=false&slide=false']) {
    const response = await app.inject({ url: `/auth/me${query}`, headers: bearer(token) })
    t.equal(response.statusCode, 400, query)
    t.match(response.json(), { status: 400, success: false, code: 'VALIDATION_FAILED' }, query)
  }
  for (const query of ['?slide=true', '?slide=false', '?_=1733580000000', '?']) {
    const response = await app.inject({ url: `/auth/me${query}`, headers: bearer(token) })
    t.equal(response.statusCode, 200, query)
    t.equal(response.json().data.authenticated, true, query)
  }
  const anonymous = await app.inject({ url: '/auth/me?slide=false' })
  t.same(anonymous.json().data, { authenticated: false }, 'without a session, as without the parameter')
})

t.test('the web app\'s own poll, with its session cookie, slides nothing with slide=false', async (t) => {
  const stack = await startWebStack(t, { env: { CORS_ORIGINS: APP_ORIGIN, SESSION_IDLE_TTL: '3s', SESSION_ABSOLUTE_TTL: '1h' } })
  const browser = new Browser()
  await stack.signIn(browser, 'alice@example.com')
  const cookie = stack.sessionOf(browser) as string
  const signedInAt = Date.now()
  // What a browser sends for `fetch('https://api.example.com/auth/me?slide=false', { credentials: 'include' })` on the app's page.
  const poll = async (): Promise<LightMyRequestResponse> => await stack.app.inject({ url: '/auth/me?slide=false', headers: FROM_APP, cookies: { [SESSION_COOKIE]: cookie } })
  const first = await poll()
  t.equal(first.statusCode, 200)
  t.equal(first.headers['access-control-allow-origin'], APP_ORIGIN, 'the app may read it')
  const expiresAt = (first.json() as { data: Me }).data.expiresAt
  for (const at of [1000, 2000]) {
    await sleep(Math.max(0, signedInAt + at - Date.now()))
    t.same((await poll()).json().data, { authenticated: true, email: 'alice@example.com', expiresAt }, `at +${at} ms: the same expiry`)
  }
  await sleep(Math.max(0, signedInAt + 3600 - Date.now()))
  t.same((await poll()).json().data, { authenticated: false }, 'the session idled out under the poll')
})

t.test('slide=false is /auth/me\'s alone: on another route the session\'s use slides its idle expiry all the same', async (t) => {
  // 3 s idle, as above: a lookup 1 s after the sign-in slides the expiry by about 1 s.
  const { app, issuer } = await buildTestApp(t, { env: { SESSION_IDLE_TTL: '3s', SESSION_ABSOLUTE_TTL: '1h' } })
  const token = await signIn(app, issuer, 'used@example.com')
  const signedInAt = Date.now()
  const expiresAt = async (): Promise<number> => {
    const response = await app.inject({ url: '/auth/me?slide=false', headers: bearer(token) })
    return Date.parse((response.json() as { data: Me }).data.expiresAt as string)
  }
  const before = await expiresAt()
  await sleep(Math.max(0, signedInAt + 1000 - Date.now()))
  // The upstream is unreachable here (any answer will do): the session was looked up, and used.
  await app.inject({ url: '/appointments?slide=false', headers: bearer(token) })
  t.ok(await expiresAt() > before + 500, 'GET /appointments?slide=false moved the expiry')
})

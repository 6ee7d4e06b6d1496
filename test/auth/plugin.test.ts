import t, { type Test } from 'tap'
import Fastify from 'fastify'
import cookie from '@fastify/cookie'
import { loadConfig } from '../../src/config.js'
import { answersPlugin } from '../../src/plugins/answers.js'
import { createSharedState } from '../../src/state/redis.js'
import { authPlugin, type AuthMode } from '../../src/auth/plugin.js'
import { SESSION_COOKIE } from '../../src/auth/cookie.js'

/**
 * The transport rules on a bare instance, with the cookie plugin registered ahead of sessions as
 * the web work will do.
 */
async function probeApp (t: Test) {
  const config = loadConfig({ CV_API_KEY: 'test-org-key', OIDC_ISSUER: 'http://127.0.0.1:9', OIDC_CLIENT_ID: 'patient-mobile' })
  const app = Fastify({ logger: false })
  app.decorate('config', config)
  app.decorate('sharedState', createSharedState({ url: null, log: app.log }))
  await app.register(answersPlugin)
  await app.register(cookie)
  await app.register(authPlugin)
  for (const [path, auth] of [['/required', 'required'], ['/optional', 'optional'], ['/typo', 'requried'], ['/public', undefined]] as const) {
    app.get(path, { config: auth === undefined ? {} : { auth: auth as AuthMode } }, async function probe (request) {
      return { transport: request.sessionTransport, email: request.session?.email ?? null }
    })
  }
  t.teardown(() => app.close())
  await app.ready()
  const { token } = await app.sessions.create({ email: 'web@example.com', subject: 's', issuer: config.oidc.issuer, method: 'web', idpSessionId: null })
  const { token: mobile } = await app.sessions.create({ email: 'mobile@example.com', subject: 's', issuer: config.oidc.issuer, method: 'mobile', idpSessionId: null })
  return { app, token, mobile }
}

t.test('the cookie carries a session when there is no bearer', async (t) => {
  const { app, token, mobile } = await probeApp(t)
  const withCookie = await app.inject({ url: '/required', cookies: { [SESSION_COOKIE]: token } })
  t.same(withCookie.json(), { transport: 'cookie', email: 'web@example.com' })
  const both = await app.inject({ url: '/required', cookies: { [SESSION_COOKIE]: token }, headers: { authorization: `Bearer ${mobile}` } })
  t.same(both.json(), { transport: 'bearer', email: 'mobile@example.com' }, 'bearer first')
  const badBearer = await app.inject({ url: '/required', cookies: { [SESSION_COOKIE]: token }, headers: { authorization: 'Bearer nope' } })
  t.equal(badBearer.statusCode, 401, 'a bad bearer never falls back to the cookie')
  const otherScheme = await app.inject({ url: '/required', cookies: { [SESSION_COOKIE]: token }, headers: { authorization: 'Basic eDp5' } })
  t.same(otherScheme.json().transport, 'cookie', 'another scheme is not a bearer')
  // A bare `Bearer` (no token at all) is a bad bearer, not an absent one: no fallback to the cookie
  // (kills `/^bearer[ \t]/i` for `/^bearer(?:[ \t]|$)/i`, presented.ts); a scheme that merely
  // begins with "bearer" is another scheme (kills `/^bearer/i`).
  for (const authorization of ['Bearer', 'bearer']) {
    const empty = await app.inject({ url: '/required', cookies: { [SESSION_COOKIE]: token }, headers: { authorization } })
    t.equal(empty.statusCode, 401, `${authorization} alone never falls back to the cookie`)
  }
  const longer = await app.inject({ url: '/required', cookies: { [SESSION_COOKIE]: token }, headers: { authorization: `Bearerish ${mobile}` } })
  t.same(longer.json(), { transport: 'cookie', email: 'web@example.com' }, 'a scheme named Bearerish is not a bearer')
  const wrongName = await app.inject({ url: '/required', cookies: { 'bff-session': token } })
  t.equal(wrongName.statusCode, 401, 'only the __Host- cookie')
  t.equal((await app.inject({ url: '/required', cookies: { [SESSION_COOKIE]: 'junk' } })).statusCode, 401)
})

t.test('auth modes', async (t) => {
  const { app, token } = await probeApp(t)
  const none = await app.inject({ url: '/optional' })
  t.same(none.json(), { transport: null, email: null })
  t.equal((await app.inject({ url: '/typo' })).statusCode, 401, 'an unknown mode fails closed')
  t.same((await app.inject({ url: '/typo', cookies: { [SESSION_COOKIE]: token } })).json().transport, 'cookie')
  const open = await app.inject({ url: '/public', cookies: { [SESSION_COOKIE]: token } })
  t.same(open.json(), { transport: null, email: null }, 'routes without auth never resolve a session')
})

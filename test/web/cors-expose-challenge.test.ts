import t from 'tap'
import { request } from 'undici'
import { startWebStack } from './stack.js'

/**
 * A web app on another site signs in with a bearer token (README: the cookie is SameSite=Strict)
 * and calls through CORS. Its 401s differ only by their challenge: `Bearer` (no token sent) or
 * `Bearer error="invalid_token"` (the token is unknown, expired or signed out: sign in again, RFC
 * 6750, 3.1). WWW-Authenticate is not a CORS-safelisted response header: unless it is exposed,
 * the app's script reads null there and cannot tell the two apart.
 */

const APP_ORIGIN = 'https://patient.other-site.example'

t.test('a CORS app can read the 401\'s challenge', async (t) => {
  const stack = await startWebStack(t, { env: { CORS_ORIGINS: APP_ORIGIN } })
  const token = await stack.bearerFor('alice@example.com')
  const logout = await request(`${stack.publicUrl}/auth/logout`, { method: 'POST', headers: { authorization: `Bearer ${token}`, origin: APP_ORIGIN } })
  t.equal(logout.statusCode, 200)
  await logout.body.dump()

  const refused = await request(`${stack.publicUrl}/appointments`, { headers: { authorization: `Bearer ${token}`, origin: APP_ORIGIN } })
  await refused.body.dump()
  t.equal(refused.statusCode, 401)
  t.equal(refused.headers['www-authenticate'], 'Bearer error="invalid_token"')
  t.equal(refused.headers['access-control-allow-origin'], APP_ORIGIN)
  const exposed = String(refused.headers['access-control-expose-headers']).split(/\s*,\s*/).map((name) => name.toLowerCase())
  t.ok(exposed.includes('www-authenticate'), `WWW-Authenticate is exposed: ${exposed.join(', ')}`)
})

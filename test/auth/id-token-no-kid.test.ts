import t from 'tap'
import { randomUUID } from 'node:crypto'
import { buildTestApp } from '../helpers/app.js'
import { BACKCHANNEL_LOGOUT_EVENT } from '../../src/web/backchannel.js'

/**
 * README, Sessions and sign-in: "The token must be signed by a key of the issuer's JWKS". A token
 * without a `kid` (the header member is optional, RFC 7515 4.1.4) names no key, and while the IdP
 * publishes two keys of its type (during a rotation) jose finds both: each is tried, as jose's
 * JWKSMultipleMatchingKeys is meant to be used, rather than the token refused for the IdP's
 * rotation. A signature neither key verifies is still refused.
 */

const WEB_CLIENT = { OIDC_CLIENT_SECRET: 'test-web-client-secret-0123456789', PUBLIC_URL: 'https://patient.example' }

t.test('an ID token without kid is checked against every published key of its type', async (t) => {
  const { app, issuer } = await buildTestApp(t, { env: WEB_CLIENT })
  const exchange = async (idToken: string): Promise<number> =>
    (await app.inject({ method: 'POST', url: '/auth/session', payload: { idToken } })).statusCode
  // Both RSA keys published from the first fetch of the key set on.
  issuer.rotate()
  t.equal(await exchange(await issuer.sign({}, { key: 'rotated', header: { kid: undefined } })), 201, 'signed by the new key, the old one published too')
  t.equal(await exchange(await issuer.sign({}, { header: { kid: undefined } })), 201, 'signed by the old key, the new one published too')
  t.equal(await exchange(await issuer.sign({}, { key: 'unknown', header: { kid: undefined } })), 401, 'signed by neither: refused')
  t.equal(await exchange(await issuer.sign({ exp: Math.floor(Date.now() / 1000) - 120 }, { key: 'rotated', header: { kid: undefined } })), 401, 'signed by one, expired: refused')

  const logout = await issuer.sign({ events: { [BACKCHANNEL_LOGOUT_EVENT]: {} }, jti: randomUUID(), email: undefined, email_verified: undefined }, { key: 'rotated', header: { kid: undefined } })
  const answer = await app.inject({
    method: 'POST',
    url: '/auth/backchannel-logout',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    payload: new URLSearchParams({ logout_token: logout }).toString()
  })
  t.equal(answer.statusCode, 200, 'a logout token without kid too')
})

t.test('a logout token without kid refused for its signature or its claims is logged with its own reason, not the key set\'s', async (t) => {
  const lines: string[] = []
  const { app, issuer } = await buildTestApp(t, { env: WEB_CLIENT, logStream: { write: (line: string) => { lines.push(line) } } })
  issuer.rotate()
  const refusal = async (claims: Record<string, unknown>, key: 'rs256' | 'unknown'): Promise<unknown> => {
    const token = await issuer.sign({ events: { [BACKCHANNEL_LOGOUT_EVENT]: {} }, jti: randomUUID(), email: undefined, email_verified: undefined, ...claims }, { key, header: { kid: undefined } })
    lines.length = 0
    const answer = await app.inject({
      method: 'POST',
      url: '/auth/backchannel-logout',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      payload: new URLSearchParams({ logout_token: token }).toString()
    })
    t.equal(answer.statusCode, 400)
    return lines.map((line) => JSON.parse(line) as { refusal?: unknown }).find((entry) => entry.refusal !== undefined)?.refusal
  }
  // Two RSA keys published: jose leaves both to try (JWKSMultipleMatchingKeys).
  t.equal(await refusal({}, 'unknown'), 'ERR_JWS_SIGNATURE_VERIFICATION_FAILED', 'signed by neither key: a signature failure')
  // Signed by the first key jose offers, and expired: its claims decide, the other key is not tried.
  t.equal(await refusal({ exp: Math.floor(Date.now() / 1000) - 120 }, 'rs256'), 'ERR_JWT_EXPIRED', 'signed by one key, expired')
})

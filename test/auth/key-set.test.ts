import t from 'tap'
import { randomUUID } from 'node:crypto'
import { createIdTokenVerifier } from '../../src/auth/id-token.js'
import { createIssuerKeys, type IssuerKeysOptions } from '../../src/auth/key-set.js'
import { BACKCHANNEL_LOGOUT_EVENT, createLogoutTokenVerifier, InvalidLogoutToken } from '../../src/web/backchannel.js'
import { createReplayGuard } from '../../src/web/replay-guard.js'
import { createLogoutMarks } from '../../src/auth/logout-marks.js'
import { startIssuer, type SignOptions, type TestIssuer } from '../helpers/issuer.js'

/**
 * One key set for the IdP, shared by the mobile ID token verifier and the back-channel logout
 * verifier: the issuer's request counts prove that they discover it once, fetch its JWKS once,
 * and refetch it once for a new key whichever of them meets it first.
 */

const INVALID_ID_TOKEN = { statusCode: 401, code: 'SESSION_REQUIRED' }
const UNAVAILABLE = { statusCode: 503, code: 'SERVICE_UNAVAILABLE', headers: { 'retry-after': '5' } }

/** Both verifiers on one key set, as src/auth/plugin.ts and src/web/plugin.ts wire them. */
function verifiersFor (issuer: TestIssuer, options: Partial<IssuerKeysOptions> = {}) {
  const keys = createIssuerKeys({ issuer: issuer.url, jwksCooldownMs: 0, ...options })
  const idTokens = createIdTokenVerifier({ keys, audiences: [issuer.clientId], retired: createReplayGuard({ redis: null }), logouts: createLogoutMarks({ redis: null }) })
  const logoutTokens = createLogoutTokenVerifier({ keys, audiences: [issuer.clientId], replayGuard: createReplayGuard({ redis: null }) })
  const logoutToken = async (signOptions: SignOptions = {}) =>
    await issuer.sign({ events: { [BACKCHANNEL_LOGOUT_EVENT]: {} }, jti: randomUUID(), email: undefined, email_verified: undefined }, signOptions)
  return { keys, idTokens, logoutTokens, logoutToken }
}

t.test('a rotated key is seen by both verifiers after one JWKS fetch', async (t) => {
  const issuer = await startIssuer(t)
  const { idTokens, logoutTokens, logoutToken } = verifiersFor(issuer)
  t.ok(await idTokens.verify(await issuer.sign()))
  t.match(await logoutTokens(await logoutToken()), { issuer: issuer.url, subject: 'patient-subject-1', sid: null })
  t.same(issuer.hits, { discovery: 1, jwks: 1 }, 'one discovery and one JWKS fetch for both')

  issuer.rotate()
  t.ok(await logoutTokens(await logoutToken({ key: 'rotated' })), 'the logout verifier meets the new key first')
  t.equal(issuer.hits.jwks, 2, 'one refetch')
  t.ok(await idTokens.verify(await issuer.sign({}, { key: 'rotated' })), 'the ID token verifier knows it already')
  t.same(issuer.hits, { discovery: 1, jwks: 2 }, 'without a fetch of its own')
})

t.test('the refetch cooldown is shared: unknown kids from either side cost one JWKS fetch at most', async (t) => {
  const issuer = await startIssuer(t)
  // jose's 30 s cooldown, as in production.
  const { idTokens, logoutTokens, logoutToken } = verifiersFor(issuer, { jwksCooldownMs: undefined })
  t.ok(await idTokens.verify(await issuer.sign()))
  for (let i = 0; i < 3; i++) {
    await t.rejects(idTokens.verify(await issuer.sign({}, { key: 'unknown' })), INVALID_ID_TOKEN)
    const refused = await logoutTokens(await logoutToken({ key: 'unknown' })).then(() => null, (error: unknown) => error)
    t.ok(refused instanceof InvalidLogoutToken, 'an unknown kid is the token\'s fault: refused, not a 503')
    t.match(refused, { reason: 'ERR_JWKS_NO_MATCHING_KEY' })
  }
  t.equal(issuer.hits.jwks, 1, 'no refetch within the cooldown, whichever verifier asks')
})

t.test('an IdP failure is a 503 for both verifiers, and discovery is retried for both', async (t) => {
  const issuer = await startIssuer(t)
  const { keys, idTokens, logoutTokens, logoutToken } = verifiersFor(issuer)
  issuer.behaviour.discoveryStatus = 500
  await t.rejects(idTokens.verify(await issuer.sign()), UNAVAILABLE, 'discovery down: ID token')
  await t.rejects(logoutTokens(await logoutToken()), UNAVAILABLE, 'discovery down: logout token')
  issuer.behaviour.discoveryStatus = 200
  t.ok(await logoutTokens(await logoutToken()))
  t.ok(await idTokens.verify(await issuer.sign()))
  t.same(issuer.hits, { discovery: 3, jwks: 1 }, 'two failed discoveries, then one for both')
  t.equal((await keys.resolve()).keys, (await keys.resolve()).keys, 'one key lookup (one jose cache) from then on')

  // The JWKS fails on the refetch for a new key: the IdP's fault on either side.
  issuer.behaviour.jwksStatus = 500
  await t.rejects(logoutTokens(await logoutToken({ key: 'unknown' })), UNAVAILABLE, 'JWKS down: logout token')
  await t.rejects(idTokens.verify(await issuer.sign({}, { key: 'unknown' })), UNAVAILABLE, 'JWKS down: ID token')
})

t.test("the provider's end-session endpoint: known once a discovery succeeded, when usable", async (t) => {
  for (const [published, expected] of [[undefined, 'own'], [null, null], ['http://evil.example/logout', null], ['not a url', null], ['ftp://127.0.0.1/logout', null], ['javascript://localhost/%0Aalert(document.cookie)', null]] as const) {
    const issuer = await startIssuer(t)
    issuer.behaviour.endSessionEndpoint = published
    const keys = createIssuerKeys({ issuer: issuer.url })
    t.equal(keys.discovered(), null, 'nothing before a discovery')
    await keys.resolve()
    t.equal(keys.discovered()?.endSessionEndpoint, expected === 'own' ? `${issuer.url}/logout` : null, `published ${String(published)}`)
  }
})

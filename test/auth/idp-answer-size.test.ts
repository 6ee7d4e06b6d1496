import t from 'tap'
import { createIdTokenVerifier } from '../../src/auth/id-token.js'
import { createIssuerKeys } from '../../src/auth/key-set.js'
import { createReplayGuard } from '../../src/web/replay-guard.js'
import { createLogoutMarks } from '../../src/auth/logout-marks.js'
import { startIssuer, type TestIssuer } from '../helpers/issuer.js'

/**
 * The identity provider's discovery document and key set are a few kilobytes. One of megabytes (a
 * misconfigured endpoint, a proxy's error page, a hostile answer on the way) is the IdP failing us,
 * a 503, and is not read whole into memory: every sign-in would otherwise hold it for as long as
 * it takes to arrive within the fetch deadline.
 */

const UNAVAILABLE = { statusCode: 503, code: 'SERVICE_UNAVAILABLE' }
const HUGE = 'x'.repeat(2 * 1024 * 1024)

const verifierFor = (issuer: TestIssuer) => createIdTokenVerifier({
  keys: createIssuerKeys({ issuer: issuer.url, jwksCooldownMs: 0 }),
  audiences: [issuer.clientId],
  retired: createReplayGuard({ redis: null }),
  logouts: createLogoutMarks({ redis: null })
})

t.test('a key set of megabytes is the IdP failing: 503; an ordinary one is read again after it', async (t) => {
  const issuer = await startIssuer(t)
  const verifier = verifierFor(issuer)
  const keys = await (await fetch(`${issuer.url}/jwks`)).json() as { keys: unknown[] }
  issuer.behaviour.jwksBody = { keys: keys.keys, padding: HUGE }
  await t.rejects(verifier.verify(await issuer.sign()), UNAVAILABLE)
  issuer.behaviour.jwksBody = { keys: keys.keys, padding: 'x'.repeat(64 * 1024) }
  t.ok(await verifier.verify(await issuer.sign()), 'a key set with some room to spare is read')
})

t.test('a discovery document of megabytes is the IdP failing: 503; discovery is tried again', async (t) => {
  const issuer = await startIssuer(t)
  const verifier = verifierFor(issuer)
  issuer.behaviour.discoveryExtra = { padding: HUGE }
  await t.rejects(verifier.verify(await issuer.sign()), UNAVAILABLE)
  issuer.behaviour.discoveryExtra = { padding: 'x'.repeat(64 * 1024) }
  t.ok(await verifier.verify(await issuer.sign()), 'a document with some room to spare is read')
})

t.test('an answer without a body is the IdP failing too', async (t) => {
  const issuer = await startIssuer(t)
  const verifier = verifierFor(issuer)
  issuer.behaviour.discoveryStatus = 204
  await t.rejects(verifier.verify(await issuer.sign()), UNAVAILABLE, 'discovery')
  issuer.behaviour.discoveryStatus = 200
  issuer.behaviour.jwksStatus = 204
  await t.rejects(verifier.verify(await issuer.sign()), UNAVAILABLE, 'key set')
  issuer.behaviour.jwksStatus = 200
  t.ok(await verifier.verify(await issuer.sign()))
})

import t from 'tap'
import { createServer } from 'node:http'
import { createIdTokenVerifier } from '../../src/auth/id-token.js'
import { createIssuerKeys, MAX_IDP_DOCUMENT_BYTES } from '../../src/auth/key-set.js'
import { createReplayGuard } from '../../src/web/replay-guard.js'
import { createLogoutMarks } from '../../src/auth/logout-marks.js'
import { startIssuer, type TestIssuer } from '../helpers/issuer.js'
import { listenOnLoopback } from '../helpers/ports.js'

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

// 204: an answer without a body; 500: an answer read here keeps its status, an error status with
// a usable body (the helper sends its ordinary document or key set under whatever status it is
// given) still being the IdP failing.
for (const status of [204, 500]) {
  t.test(`an answer ${status} is the IdP failing, for the discovery document and the key set`, async (t) => {
    const issuer = await startIssuer(t)
    const verifier = verifierFor(issuer)
    issuer.behaviour.discoveryStatus = status
    await t.rejects(verifier.verify(await issuer.sign()), UNAVAILABLE, 'discovery')
    issuer.behaviour.discoveryStatus = 200
    issuer.behaviour.jwksStatus = status
    await t.rejects(verifier.verify(await issuer.sign()), UNAVAILABLE, 'key set')
    issuer.behaviour.jwksStatus = 200
    t.ok(await verifier.verify(await issuer.sign()))
  })
}

t.test('the bound is inclusive: a key set of exactly MAX_IDP_DOCUMENT_BYTES is read, one byte more is not', async (t) => {
  const keys = async (issuer: TestIssuer) => (await (await fetch(`${issuer.url}/jwks`)).json() as { keys: unknown[] }).keys
  // The issuer sends JSON.stringify of the body (ASCII here: one byte a character).
  const padded = (published: unknown[], bytes: number) => {
    const bare = JSON.stringify({ keys: published, padding: '' }).length
    const body = { keys: published, padding: 'x'.repeat(bytes - bare) }
    t.equal(Buffer.byteLength(JSON.stringify(body)), bytes)
    return body
  }
  const atBound = await startIssuer(t)
  atBound.behaviour.jwksBody = padded(await keys(atBound), MAX_IDP_DOCUMENT_BYTES)
  t.ok(await verifierFor(atBound).verify(await atBound.sign()), 'exactly at the bound: read')
  const over = await startIssuer(t)
  over.behaviour.jwksBody = padded(await keys(over), MAX_IDP_DOCUMENT_BYTES + 1)
  await t.rejects(verifierFor(over).verify(await over.sign()), UNAVAILABLE, 'one byte over: 503')
})

t.test('an answer over the bound is refused whole, not read up to the bound: a valid key set followed by padding is still a 503', async (t) => {
  const issuer = await startIssuer(t)
  const keys = await (await fetch(`${issuer.url}/jwks`)).text()
  // The key set, then whitespace past the bound (JSON allows it): its first 512 KiB alone parse.
  const padded = createServer((_request, response) => {
    response.writeHead(200, { 'content-type': 'application/json' })
    response.end(keys + ' '.repeat(MAX_IDP_DOCUMENT_BYTES))
  })
  issuer.behaviour.jwksUri = `http://127.0.0.1:${await listenOnLoopback(t, padded)}/jwks`
  await t.rejects(verifierFor(issuer).verify(await issuer.sign()), UNAVAILABLE)
})

import t from 'tap'
import { createServer } from 'node:http'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import { pino } from 'pino'
import { ApiError } from '../../src/errors.js'
import { REDACT_PATHS } from '../../src/logging.js'
import { createIdTokenVerifier, ID_TOKEN_ALGORITHMS, idTokenId, MAX_ID_TOKEN_LENGTH, type IdTokenVerifierOptions } from '../../src/auth/id-token.js'
import { createIssuerKeys, type IssuerKeysOptions } from '../../src/auth/key-set.js'
import { createReplayGuard } from '../../src/web/replay-guard.js'
import { createLogoutMarks } from '../../src/auth/logout-marks.js'
import { garbageToken, startIssuer, type TestIssuer } from '../helpers/issuer.js'

const memoryGuard = () => createReplayGuard({ redis: null })
const memoryMarks = () => createLogoutMarks({ redis: null })

/** A verifier with a key set of its own (test/auth/key-set.test.ts shares one between verifiers). */
const verifierFor = (issuer: TestIssuer, options: Partial<IdTokenVerifierOptions> = {}, keyOptions: Partial<IssuerKeysOptions> = {}) =>
  createIdTokenVerifier({
    keys: createIssuerKeys({ issuer: issuer.url, jwksCooldownMs: 0, ...keyOptions }),
    audiences: ['other-app', issuer.clientId],
    retired: memoryGuard(),
    logouts: memoryMarks(),
    ...options
  })

const INVALID = { statusCode: 401, code: 'SESSION_REQUIRED', message: 'Invalid ID token' }
const UNAVAILABLE = { statusCode: 503, code: 'SERVICE_UNAVAILABLE' }

async function refusal (promise: Promise<unknown>): Promise<unknown> {
  return promise.then(() => null, (error: unknown) => error)
}

t.test('accepts a valid token signed with RS256 or ES256', async (t) => {
  const issuer = await startIssuer(t)
  const verifier = verifierFor(issuer)
  const iat = Math.floor(Date.now() / 1000)
  t.same(await verifier.verify(await issuer.sign({ sid: 'idp-session-1', iat })), {
    email: 'patient@example.com',
    subject: 'patient-subject-1',
    issuer: issuer.url,
    sid: 'idp-session-1',
    authTime: iat
  })
  t.equal((await verifier.verify(await issuer.sign({}, { key: 'es256' }))).sid, null)
  await t.rejects(verifier.verify(await issuer.sign({ aud: ['someone-else', issuer.clientId] })), INVALID, 'one of ours among untrusted audiences, no azp (OIDC Core 3.1.3.7, 3)')
  t.ok(await verifier.verify(await issuer.sign({ aud: ['other-app', issuer.clientId] })), 'several audiences, all ours')
  t.ok(await verifier.verify(await issuer.sign({ aud: 'other-app' })), 'any configured audience')
  t.ok(await verifier.verify(await issuer.sign({ aud: ['someone-else', issuer.clientId], azp: issuer.clientId })), 'issued to us (azp), with other audiences')
  t.ok(await verifier.verify(await issuer.sign({ azp: 'other-app' })), 'issued to any configured audience')
  t.equal(issuer.hits.discovery, 1, 'discovery fetched once and cached')
  t.equal(issuer.hits.jwks, 1, 'JWKS fetched once and cached')
  t.notOk(ID_TOKEN_ALGORITHMS.some((alg) => alg.startsWith('HS') || alg === 'none'))
})

t.test('auth_time, when present, is what must be recent', async (t) => {
  const issuer = await startIssuer(t)
  const verifier = verifierFor(issuer)
  const nowSec = Math.floor(Date.now() / 1000)
  await t.rejects(verifier.verify(await issuer.sign({ auth_time: nowSec - 3600 })), INVALID)
  t.ok(await verifier.verify(await issuer.sign({ auth_time: nowSec - 60 })))
  await t.rejects(verifier.verify(await issuer.sign({ auth_time: nowSec + 3600 })), INVALID, 'not in the future either')
  await t.rejects(verifier.verify(await issuer.sign({ iat: nowSec + 3600, auth_time: nowSec })), INVALID, 'iat in the future')
  t.ok(await verifier.verify(await issuer.sign({ iat: nowSec - 620 })), 'just over 10 minutes, within the clock tolerance')
})

t.test('refuses every kind of bad token with the same 401 (an unverified email told as such)', async (t) => {
  const issuer = await startIssuer(t)
  const debug: Array<Record<string, unknown>> = []
  // With the service's redaction paths, as app.log has them.
  const log = pino({ level: 'debug', redact: { paths: REDACT_PATHS, censor: '[redacted]' } }, { write: (line: string) => { debug.push(JSON.parse(line) as Record<string, unknown>) } })
  const verifier = verifierFor(issuer, { log })
  const nowSec = Math.floor(Date.now() / 1000)
  const cases: Array<[string, Promise<string> | string]> = [
    ['wrong aud', issuer.sign({ aud: 'someone-else' })],
    ['wrong iss', issuer.sign({ iss: 'https://evil.example' })],
    ['ours among the audiences, issued to another client (azp)', issuer.sign({ aud: ['third-party', issuer.clientId], azp: 'third-party' })],
    ['our audience, issued to another client (azp)', issuer.sign({ azp: 'third-party' })],
    ['azp not a string', issuer.sign({ azp: [issuer.clientId] })],
    ['auth_time as a string (an old sign-in, a fresh iat)', issuer.sign({ auth_time: String(nowSec - 86_400) })],
    ['expired', issuer.sign({ exp: nowSec - 120 })],
    ['no exp', issuer.sign({ exp: undefined })],
    ['nbf in the future', issuer.sign({ nbf: nowSec + 600 })],
    ['iat too old', issuer.sign({ iat: nowSec - 3600 })],
    ['no iat', issuer.sign({ iat: undefined })],
    ['no sub', issuer.sign({ sub: undefined })],
    ['empty sub', issuer.sign({ sub: '' })],
    ['unverified email', issuer.sign({ email_verified: false })],
    ['email_verified as a string', issuer.sign({ email_verified: 'true' })],
    ['missing email', issuer.sign({ email: undefined })],
    ['email not a string', issuer.sign({ email: ['a@example.com'] })],
    ['email without @', issuer.sign({ email: 'patient' })],
    // Kills dropping `email.length > 254` (id-token.ts): 255 characters, with an @.
    ['email over 254 characters', issuer.sign({ email: `${'a'.repeat(243)}@example.com` })],
    // Kills dropping the auth_time type check (id-token.ts): a string that is no number makes the
    // age NaN, which no comparison refuses; null would read as absent (iat).
    ['auth_time a word', issuer.sign({ auth_time: 'recently' })],
    ['auth_time null', issuer.sign({ auth_time: null })],
    ['alg none', issuer.sign({}, { alg: 'none' })],
    ['HS256', issuer.sign({}, { alg: 'HS256' })],
    ['unknown kid', issuer.sign({}, { key: 'unknown' })],
    ['an access token', issuer.sign({}, { header: { typ: 'at+jwt' } })],
    ['garbage', garbageToken()],
    ['empty', ''],
    ['too long', 'a'.repeat(MAX_ID_TOKEN_LENGTH + 1)]
  ]
  const good = await issuer.sign()
  const [head, body] = good.split('.')
  cases.push(['bad signature', `${head}.${body}.${Buffer.from('x'.repeat(256)).toString('base64url')}`])
  const other = (await issuer.sign({ email: 'attacker@example.com' })).split('.')
  cases.push(['payload swapped under a valid signature', `${head}.${other[1]}.${good.split('.')[2]}`])
  // Kills MAX_ID_TOKEN_LENGTH raised (id-token.ts): a token over 8192 characters is refused however
  // well signed, not only garbage of that length (which jose refuses anyway).
  let padded = ''
  for (let pad = 5500; padded.length <= MAX_ID_TOKEN_LENGTH; pad += 30) padded = await issuer.sign({ pad: 'x'.repeat(pad) })
  t.ok(padded.length < MAX_ID_TOKEN_LENGTH + 200, `a signed token of ${padded.length} characters`)
  cases.push(['signed, and too long', padded])
  for (const [name, tokenOrPromise] of cases) {
    const error = await refusal(verifier.verify(await tokenOrPromise))
    t.ok(error instanceof ApiError, name)
    // The same for every check but the one a patient can act on (an email not verified).
    const message = /^(unverified email|email_verified as a string)$/.test(name) ? /not verified with your sign-in provider/ : 'Invalid ID token'
    t.match(error, { statusCode: 401, code: 'SESSION_REQUIRED', message, headers: { 'www-authenticate': 'Bearer' } }, name)
  }
  t.ok(debug.length > 0)
  for (const line of debug) {
    t.equal(line.msg, 'ID token refused')
    t.type(line.refusal, 'string')
    t.not(line.refusal, '[redacted]')
    t.notOk(JSON.stringify(line).includes(head as string), 'the token never reaches the log')
  }
  t.ok(debug.some((line) => line.refusal === 'email_verified'))
  t.ok(debug.some((line) => line.refusal === 'ERR_JOSE_ALG_NOT_ALLOWED'))
})

t.test('access and logout token types are refused in any letter case', async (t) => {
  const issuer = await startIssuer(t)
  const refusals: Array<Record<string, unknown>> = []
  const log = pino({ level: 'debug' }, { write: (line: string) => { refusals.push(JSON.parse(line) as Record<string, unknown>) } })
  const verifier = verifierFor(issuer, { log })
  // Media types are case-insensitive (RFC 9110 §8.3.1): an upper-case typ names the same type.
  for (const typ of ['AT+JWT', 'Application/Logout+JWT', 'application/AT+jwt', 'LOGOUT+JWT']) {
    t.match(await refusal(verifier.verify(await issuer.sign({}, { header: { typ } }))), INVALID, typ)
  }
  t.same(refusals.map((line) => line.refusal), ['typ', 'typ', 'typ', 'typ'], 'each for its type')
  t.ok(await verifier.verify(await issuer.sign({}, { header: { typ: 'JWT' } })), 'an ID token typed JWT is fine')
})

t.test('a logout token without its typ is no sign-in, even with the claims of an ID token', async (t) => {
  // Back-Channel Logout 1.0 §2.4: explicit typing is only recommended, and the events claim is
  // what makes a logout token one (a Security Event Token, RFC 8417, as any token with events
  // is). An identity provider that types none and puts email and email_verified in it must not
  // have its logout tokens taken for sign-ins.
  const issuer = await startIssuer(t)
  const refusals: Array<Record<string, unknown>> = []
  const log = pino({ level: 'debug' }, { write: (line: string) => { refusals.push(JSON.parse(line) as Record<string, unknown>) } })
  const verifier = verifierFor(issuer, { log })
  const events = { 'http://schemas.openid.net/event/backchannel-logout': {} }
  t.match(await refusal(verifier.verify(await issuer.sign({ events, jti: 'logout-1', sid: 'sid-1' }))), INVALID, 'events: refused')
  t.match(await refusal(verifier.verify(await issuer.sign({ events: { 'https://example.com/event/other': {} } }))), INVALID, 'another event: refused')
  // Any events claim at all: a malformed one (null, empty) does not make the token a sign-in.
  t.match(await refusal(verifier.verify(await issuer.sign({ events: null }))), INVALID, 'events null: refused')
  t.match(await refusal(verifier.verify(await issuer.sign({ events: {} }))), INVALID, 'events empty: refused')
  t.same(refusals.map((line) => line.refusal), ['events', 'events', 'events', 'events'])
  t.ok(await verifier.verify(await issuer.sign({ jti: 'id-1', sid: 'sid-1' })), 'an ID token with jti and sid is fine')
})

t.test('unknown kid: one JWKS refresh, then refused; a rotated key is accepted after it', async (t) => {
  const issuer = await startIssuer(t)
  const verifier = verifierFor(issuer)
  t.ok(await verifier.verify(await issuer.sign()))
  t.equal(issuer.hits.jwks, 1)
  await t.rejects(verifier.verify(await issuer.sign({}, { key: 'unknown' })), INVALID)
  t.equal(issuer.hits.jwks, 2, 'exactly one refetch for an unknown kid')
  issuer.rotate()
  t.ok(await verifier.verify(await issuer.sign({}, { key: 'rotated' })), 'rotated key accepted')
  t.equal(issuer.hits.jwks, 3, 'after one refresh')
  t.ok(await verifier.verify(await issuer.sign({}, { key: 'rotated' })))
  t.equal(issuer.hits.jwks, 3, 'and cached from then on')
})

t.test('the JWKS refetch cooldown holds back a flood of unknown kids', async (t) => {
  const issuer = await startIssuer(t)
  const verifier = createIdTokenVerifier({ keys: createIssuerKeys({ issuer: issuer.url }), audiences: [issuer.clientId], retired: memoryGuard(), logouts: memoryMarks() })
  t.ok(await verifier.verify(await issuer.sign()))
  for (let i = 0; i < 5; i++) await t.rejects(verifier.verify(await issuer.sign({}, { key: 'unknown' })), INVALID)
  t.equal(issuer.hits.jwks, 1, 'no refetch within the 30 s cooldown')
})

t.test('discovery: retried after a failure, and must name the configured issuer', async (t) => {
  const issuer = await startIssuer(t)
  const verifier = verifierFor(issuer)
  const token = await issuer.sign()

  issuer.behaviour.discoveryStatus = 500
  await t.rejects(verifier.verify(token), { statusCode: 503, code: 'SERVICE_UNAVAILABLE', headers: { 'retry-after': '5' } })
  issuer.behaviour.discoveryStatus = 200
  issuer.behaviour.discoveryIssuer = 'https://impostor.example'
  await t.rejects(verifier.verify(token), UNAVAILABLE)
  issuer.behaviour.discoveryIssuer = undefined
  issuer.behaviour.jwksUri = 'http://evil.example/jwks'
  await t.rejects(verifier.verify(token), UNAVAILABLE, 'plain http only on loopback')
  issuer.behaviour.jwksUri = 'not a url'
  await t.rejects(verifier.verify(token), UNAVAILABLE)
  issuer.behaviour.jwksUri = null
  await t.rejects(verifier.verify(token), UNAVAILABLE)
  issuer.behaviour.jwksUri = undefined
  t.ok(await verifier.verify(token), 'the next call tries again and succeeds')
  t.equal(issuer.hits.discovery, 6)
  t.ok(await verifier.verify(token))
  t.equal(issuer.hits.discovery, 6, 'then cached')
})

t.test('a trailing slash on the published issuer is the same issuer', async (t) => {
  const issuer = await startIssuer(t)
  issuer.behaviour.discoveryIssuer = `${issuer.url}/`
  const verifier = verifierFor(issuer)
  t.ok(await verifier.verify(await issuer.sign({ iss: `${issuer.url}/` })))
  await t.rejects(verifier.verify(await issuer.sign()), INVALID, 'iss must then match the published one')
})

t.test('JWKS failures are the provider\'s, answered 503', async (t) => {
  const issuer = await startIssuer(t)
  const verifier = verifierFor(issuer)
  const token = await issuer.sign()
  issuer.behaviour.jwksStatus = 500
  await t.rejects(verifier.verify(token), UNAVAILABLE)
  issuer.behaviour.jwksStatus = 200
  issuer.behaviour.jwksBody = { keys: 'none' }
  await t.rejects(verifier.verify(token), UNAVAILABLE, 'not a key set')
  issuer.behaviour.jwksBody = undefined
  t.ok(await verifier.verify(token), 'recovers once the JWKS answers')

  const refused = await startIssuer(t)
  refused.behaviour.jwksUri = 'http://127.0.0.1:9/jwks'
  await t.rejects(verifierFor(refused).verify(await refused.sign()), UNAVAILABLE, 'JWKS unreachable')

  // A JWKS endpoint that never answers: jose's timeout, then 503.
  const silentServer = createServer(() => {})
  silentServer.listen(0, '127.0.0.1')
  await once(silentServer, 'listening')
  t.teardown(() => { silentServer.closeAllConnections(); silentServer.close() })
  const hung = await startIssuer(t)
  hung.behaviour.jwksUri = `http://127.0.0.1:${(silentServer.address() as AddressInfo).port}/jwks`
  const slow = verifierFor(hung, {}, { fetchTimeoutMs: 200 })
  const started = Date.now()
  await t.rejects(slow.verify(await hung.sign()), UNAVAILABLE)
  t.ok(Date.now() - started < 2000, 'bounded by the fetch timeout')

  const down = createIdTokenVerifier({ keys: createIssuerKeys({ issuer: 'http://127.0.0.1:9' }), audiences: ['x'], retired: memoryGuard(), logouts: memoryMarks() })
  await t.rejects(down.verify(token), UNAVAILABLE, 'issuer unreachable')
})

t.test('uses the injected clock', async (t) => {
  const at = Date.now() - 24 * 3600_000
  const issuer = await startIssuer(t, { now: () => at })
  const token = await issuer.sign()
  await t.rejects(verifierFor(issuer).verify(token), INVALID, 'a day old by the real clock')
  t.ok(await verifierFor(issuer, { now: () => at + 1000 }).verify(token))
})

t.test('a retired token (a web sign-in\'s) is refused for as long as it could be accepted; others are not', async (t) => {
  let at = Date.now()
  const now = () => at
  const issuer = await startIssuer(t, { now })
  const verifier = verifierFor(issuer, { now, retired: createReplayGuard({ redis: null }, now) })
  // Both live for an hour: only the age check (10 min and the tolerance) and the retirement
  // decide, not their expiry.
  const iat = Math.floor(at / 1000)
  const webToken = await issuer.sign({ exp: iat + 3600 })
  const mobileToken = await issuer.sign({ exp: iat + 3600, sid: 'other' })
  t.ok(await verifier.verify(webToken), 'accepted before it is retired')
  await verifier.retire(idTokenId(webToken))
  await t.rejects(verifier.verify(webToken), INVALID)
  t.ok(await verifier.verify(mobileToken), 'another token is not affected')
  t.ok(await verifier.verify(mobileToken), 'and may be exchanged again (a retried sign-in)')
  // The last moment the age check still passes (10 min plus the 30 s tolerance): the token of
  // the same age that was never retired is accepted, the retired one still refused.
  at += (600 + 29) * 1000
  t.ok(await verifier.verify(mobileToken))
  await t.rejects(verifier.verify(webToken), INVALID)
})

t.test('a retired token respelled in its signature is the same token', async (t) => {
  const issuer = await startIssuer(t)
  const verifier = verifierFor(issuer)
  const token = await issuer.sign()
  await verifier.retire(idTokenId(token))
  const signature = token.slice(token.lastIndexOf('.') + 1)
  const last = signature.at(-1) as string
  // RS256 signatures are 256 bytes: the last base64url character carries 4 spare bits.
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'
  const sibling = alphabet[alphabet.indexOf(last) ^ 1] as string
  for (const respelled of [`${token.slice(0, -1)}${sibling}`, `${token}==`]) {
    await t.rejects(verifier.verify(respelled), INVALID, respelled.slice(-3))
  }
})

t.test('the guard\'s store unreachable: 503, never a 401 nor an unchecked token', async (t) => {
  const issuer = await startIssuer(t)
  const down = new ApiError(503, 'SERVICE_UNAVAILABLE', 'store down')
  const verifier = verifierFor(issuer, { retired: { claim: async () => { throw down }, markUsed: async () => { throw down }, used: async () => { throw down } } })
  const token = await issuer.sign()
  await t.rejects(verifier.verify(token), UNAVAILABLE)
  await t.rejects(verifier.retire(idTokenId(token)), UNAVAILABLE)
  await t.rejects(verifier.verify(garbageToken()), INVALID, 'a bad token is refused before the store is asked')
})

t.test('a back-channel logout by IdP session: that session\'s tokens are refused, whenever signed in; other sessions\' are not', async (t) => {
  let at = Date.now()
  const now = () => at
  const issuer = await startIssuer(t, { now })
  const debug: Array<Record<string, unknown>> = []
  const log = pino({ level: 'debug', redact: { paths: REDACT_PATHS, censor: '[redacted]' } }, { write: (line: string) => { debug.push(JSON.parse(line) as Record<string, unknown>) } })
  const verifier = verifierFor(issuer, { now, log, logouts: createLogoutMarks({ redis: null }, now) })
  const nowSec = Math.floor(at / 1000)
  const ended = await issuer.sign({ sid: 'idp-sid-1', exp: nowSec + 3600 })
  const otherDevice = await issuer.sign({ sid: 'idp-sid-2', exp: nowSec + 3600 })
  const noSid = await issuer.sign({ exp: nowSec + 3600 })
  t.ok(await verifier.verify(ended))
  t.ok(await verifier.verify(ended), 'may be exchanged again before a logout')

  await verifier.recordLogout({ issuer: issuer.url, sid: 'idp-sid-1', subject: 'patient-subject-1', at: nowSec })
  await t.rejects(verifier.verify(ended), INVALID, 'the logged-out session\'s token')
  t.ok(await verifier.verify(otherDevice), 'another IdP session of the same patient is not this one\'s')
  t.ok(await verifier.verify(noSid), 'nor a token naming no IdP session: the logout ended that session, as it ends its sessions here')
  const signIn = { issuer: issuer.url, subject: 'patient-subject-1', sid: 'idp-sid-1', authTime: nowSec + 60 }
  t.equal(await verifier.loggedOut(signIn), true, 'whatever its auth_time')
  t.equal(await verifier.loggedOut({ ...signIn, issuer: 'https://another-idp.example' }), false, 'the sid of one issuer only')
  t.ok(debug.some((line) => line.refusal === 'logged_out'), 'the refusal\'s class is logged')
  for (const line of debug) t.notOk(JSON.stringify(line).includes('idp-sid-1'), 'never the sid')

  // As long as a token from before the logout could pass the age check (10 min and twice the
  // tolerance), then forgotten.
  at += (600 + 60) * 1000 - 1
  t.equal(await verifier.loggedOut(signIn), true)
  at += 1
  t.equal(await verifier.loggedOut(signIn), false)
})

t.test('a back-channel logout by subject: tokens signed in at or before it are refused, later sign-ins accepted', async (t) => {
  const at = Date.now()
  const now = () => at
  const issuer = await startIssuer(t, { now })
  const verifier = verifierFor(issuer, { now, logouts: createLogoutMarks({ redis: null }, now) })
  const nowSec = Math.floor(at / 1000)
  const before = [
    ['auth_time before', await issuer.sign({ auth_time: nowSec - 60 })],
    ['auth_time in the second of the logout', await issuer.sign({ auth_time: nowSec })],
    ['iat before, no auth_time', await issuer.sign({ iat: nowSec - 1 })],
    ['another IdP session of the subject', await issuer.sign({ auth_time: nowSec - 60, sid: 'idp-sid-2' })],
    ['minted after the logout, for a sign-in before it', await issuer.sign({ iat: nowSec + 5, auth_time: nowSec - 1 })]
  ] as const
  for (const [, token] of before) t.ok(await verifier.verify(token))

  await verifier.recordLogout({ issuer: issuer.url, sid: null, subject: 'patient-subject-1', at: nowSec })
  for (const [name, token] of before) await t.rejects(verifier.verify(token), INVALID, name)
  t.ok(await verifier.verify(await issuer.sign({ auth_time: nowSec + 1 })), 'a sign-in after the logout')
  t.ok(await verifier.verify(await issuer.sign({ iat: nowSec + 1 })), 'by iat without auth_time')
  t.ok(await verifier.verify(await issuer.sign({ sub: 'another-patient', auth_time: nowSec - 60 })), 'another subject')

  // An earlier logout of the same subject delivered late changes nothing; a later one moves the line.
  await verifier.recordLogout({ issuer: issuer.url, sid: null, subject: 'patient-subject-1', at: nowSec - 120 })
  await t.rejects(verifier.verify(await issuer.sign({ auth_time: nowSec })), INVALID)
  await verifier.recordLogout({ issuer: issuer.url, sid: null, subject: 'patient-subject-1', at: nowSec + 10 })
  await t.rejects(verifier.verify(await issuer.sign({ auth_time: nowSec + 1 })), INVALID)
})

t.test('the logouts\' store unreachable: 503, never a 401 nor an unchecked token', async (t) => {
  const issuer = await startIssuer(t)
  const down = new ApiError(503, 'SERVICE_UNAVAILABLE', 'store down')
  const verifier = verifierFor(issuer, { logouts: { mark: async () => { throw down }, markedAt: async () => { throw down } } })
  const token = await issuer.sign({ sid: 'idp-sid-1' })
  await t.rejects(verifier.verify(token), UNAVAILABLE)
  await t.rejects(verifier.verify(await issuer.sign()), UNAVAILABLE, 'without a sid too')
  await t.rejects(verifier.loggedOut({ issuer: issuer.url, subject: 'patient-subject-1', sid: null, authTime: 0 }), UNAVAILABLE)
  await t.rejects(verifier.recordLogout({ issuer: issuer.url, sid: 'idp-sid-1', subject: null, at: 0 }), UNAVAILABLE)
  await t.rejects(verifier.recordLogout({ issuer: issuer.url, sid: null, subject: 'patient-subject-1', at: 0 }), UNAVAILABLE)
  await t.rejects(verifier.verify(garbageToken()), INVALID, 'a bad token is refused before the store is asked')
})

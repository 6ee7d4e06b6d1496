import t from 'tap'
import { createIdTokenVerifier, type IdTokenVerifier } from '../../src/auth/id-token.js'
import { createIssuerKeys } from '../../src/auth/key-set.js'
import { createReplayGuard } from '../../src/web/replay-guard.js'
import { createLogoutMarks } from '../../src/auth/logout-marks.js'
import { startIssuer, type TestIssuer } from '../helpers/issuer.js'

/**
 * The contract's time checks of an ID token (POST /auth/session), at their bounds: `iat` (or
 * `auth_time`) no older than 10 minutes, `nbf` when present in the past and `exp` in the future,
 * each with a small clock tolerance. The suite refused only tokens an hour old, which a limit of
 * 30 minutes or 59 would refuse too.
 */

const INVALID = { statusCode: 401, code: 'SESSION_REQUIRED' }

function verifierOf (issuer: TestIssuer): IdTokenVerifier {
  return createIdTokenVerifier({
    keys: createIssuerKeys({ issuer: issuer.url, jwksCooldownMs: 0 }),
    audiences: [issuer.clientId],
    retired: createReplayGuard({ redis: null }),
    logouts: createLogoutMarks({ redis: null })
  })
}

t.test('iat or auth_time older than 10 minutes (and the tolerance) is refused; within them, accepted', async (t) => {
  const issuer = await startIssuer(t)
  const verifier = verifierOf(issuer)
  const nowSec = Math.floor(Date.now() / 1000)
  // Signed with exp ahead of now: only the age is at stake.
  const exp = nowSec + 300
  t.ok(await verifier.verify(await issuer.sign({ iat: nowSec - 9 * 60, exp })), 'iat 9 minutes old')
  await t.rejects(verifier.verify(await issuer.sign({ iat: nowSec - 11 * 60, exp })), INVALID, 'iat 11 minutes old')
  await t.rejects(verifier.verify(await issuer.sign({ iat: nowSec - 20 * 60, exp })), INVALID, 'iat 20 minutes old')
  t.ok(await verifier.verify(await issuer.sign({ auth_time: nowSec - 9 * 60 })), 'auth_time 9 minutes old, a fresh iat')
  await t.rejects(verifier.verify(await issuer.sign({ auth_time: nowSec - 11 * 60 })), INVALID, 'auth_time 11 minutes old, however fresh the iat')
})

t.test('nbf in the past is accepted; nbf and exp within a small clock tolerance are accepted, beyond it refused', async (t) => {
  const issuer = await startIssuer(t)
  const verifier = verifierOf(issuer)
  const nowSec = Math.floor(Date.now() / 1000)
  t.ok(await verifier.verify(await issuer.sign({ nbf: nowSec - 60 })), 'nbf a minute ago')
  t.ok(await verifier.verify(await issuer.sign({ nbf: nowSec })), 'nbf now')
  t.ok(await verifier.verify(await issuer.sign({ nbf: nowSec + 10 })), 'nbf 10 s ahead: a clock a little fast')
  await t.rejects(verifier.verify(await issuer.sign({ nbf: nowSec + 120 })), INVALID, 'nbf 2 minutes ahead')
  t.ok(await verifier.verify(await issuer.sign({ exp: nowSec - 10 })), 'exp 10 s ago: a clock a little slow')
  await t.rejects(verifier.verify(await issuer.sign({ exp: nowSec - 120 })), INVALID, 'exp 2 minutes ago')
})

import t from 'tap'
import { generateKeyPair, SignJWT } from 'jose'
import { pino } from 'pino'
import { REDACT_PATHS } from '../../src/logging.js'
import { createIdTokenVerifier, untrustedAudience } from '../../src/auth/id-token.js'
import { createReplayGuard } from '../../src/web/replay-guard.js'
import { createLogoutMarks } from '../../src/auth/logout-marks.js'
import { BACKCHANNEL_LOGOUT_EVENT, createLogoutTokenVerifier, InvalidLogoutToken } from '../../src/web/backchannel.js'

/**
 * untrustedAudience (id-token.ts) names the claim that fails, and both verifiers report that name
 * (the ID token's debug line, the logout token's `refusal`): `azp` for a token issued to another
 * party, `aud` for an untrusted extra audience without azp (OIDC Core 3.1.3.7; Back-Channel Logout
 * 2.6). The last session's commit said "same refusals, same reasons"; no test read the reasons
 * (found by a mutation review: each could be swapped or fixed to one value with every test passing).
 */
const ISSUER = 'https://idp.example'
const OURS = 'app'

t.test('untrustedAudience names the failing claim', async (t) => {
  t.equal(untrustedAudience({ aud: OURS }, [OURS]), null)
  t.equal(untrustedAudience({ aud: [OURS, 'other'] }, [OURS, 'other']), null)
  t.equal(untrustedAudience({ aud: [OURS, 'other'] }, [OURS]), 'aud')
  t.equal(untrustedAudience({ aud: [OURS, 'other'], azp: OURS }, [OURS]), null)
  t.equal(untrustedAudience({ aud: OURS, azp: 'other' }, [OURS]), 'azp')
  t.equal(untrustedAudience({ aud: OURS, azp: [OURS] }, [OURS]), 'azp', 'azp not a string')
})

t.test('the ID token and logout token verifiers report aud or azp as the reason', async (t) => {
  const { publicKey, privateKey } = await generateKeyPair('RS256')
  const keys = { resolve: async () => ({ issuer: ISSUER, keys: async () => publicKey, endSessionEndpoint: null }), discovered: () => null }
  const nowSec = Math.floor(Date.now() / 1000)
  const sign = async (claims: Record<string, unknown>, typ: string) =>
    await new SignJWT({ iss: ISSUER, iat: nowSec, exp: nowSec + 300, sub: 'subject-1', ...claims }).setProtectedHeader({ alg: 'RS256', typ }).sign(privateKey)
  const extraAudience = { aud: [OURS, 'other'] }
  const issuedToOther = { aud: OURS, azp: 'other' }

  const debug: Array<Record<string, unknown>> = []
  const log = pino({ level: 'debug', redact: { paths: REDACT_PATHS, censor: '[redacted]' } }, { write: (line: string) => { debug.push(JSON.parse(line) as Record<string, unknown>) } })
  const idTokens = createIdTokenVerifier({ keys, audiences: [OURS], retired: createReplayGuard({ redis: null }), logouts: createLogoutMarks({ redis: null }), log })
  for (const [claims, reason] of [[extraAudience, 'aud'], [issuedToOther, 'azp']] as const) {
    await t.rejects(idTokens.verify(await sign({ email: 'p@example.com', email_verified: true, ...claims }, 'JWT')), { statusCode: 401, code: 'SESSION_REQUIRED', message: 'Invalid ID token' })
    t.equal(debug.pop()?.refusal, reason, `ID token: ${reason}`)
  }

  const logoutTokens = createLogoutTokenVerifier({ keys, audiences: [OURS], replayGuard: createReplayGuard({ redis: null }) })
  let jti = 0
  for (const [claims, reason] of [[extraAudience, 'aud'], [issuedToOther, 'azp']] as const) {
    const error = await logoutTokens(await sign({ jti: `jti-${++jti}`, events: { [BACKCHANNEL_LOGOUT_EVENT]: {} }, ...claims }, 'logout+jwt')).then(() => null, (error: unknown) => error)
    t.ok(error instanceof InvalidLogoutToken, `logout token: refused (${reason})`)
    t.equal((error as InvalidLogoutToken).reason, reason, `logout token: ${reason}`)
  }
})

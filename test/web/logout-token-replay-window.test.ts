import t from 'tap'
import { generateKeyPair, SignJWT } from 'jose'
import { BACKCHANNEL_LOGOUT_EVENT, createLogoutTokenVerifier } from '../../src/web/backchannel.js'
import { createReplayGuard } from '../../src/web/replay-guard.js'

// Kills the replay guard's TTL (MAX_AGE_SEC + 2 * CLOCK_TOLERANCE_SEC) -> MAX_AGE_SEC
// (src/web/backchannel.ts, verifyLogoutToken): a token dated at the edge of the tolerance ahead (a
// fast IdP clock) passes the iat check for 300 + 2 x 30 s; its jti must be remembered that long, or
// a replay late in that span is carried out again (ending the subject's newer sessions).
const ISSUER = 'https://idp.example'

t.test('a used logout token dated ahead is a replay for as long as its iat passes the check', async (t) => {
  const { publicKey, privateKey } = await generateKeyPair('RS256')
  let clock = 1_700_000_000_000
  const verify = createLogoutTokenVerifier({
    keys: { resolve: async () => ({ issuer: ISSUER, keys: async () => publicKey, endSessionEndpoint: null }), discovered: () => null },
    audiences: ['app'],
    replayGuard: createReplayGuard({ redis: null }, () => clock),
    now: () => clock
  })
  const nowSec = Math.floor(clock / 1000)
  const token = await new SignJWT({ iss: ISSUER, aud: 'app', iat: nowSec + 30, exp: nowSec + 3600, jti: 'jti-ahead', sub: 'subject-1', events: { [BACKCHANNEL_LOGOUT_EVENT]: {} } })
    .setProtectedHeader({ alg: 'RS256', typ: 'logout+jwt' }).sign(privateKey)
  const claims = await verify(token)
  await claims.markUsed()
  clock += 355_000
  await t.rejects(verify(token), { name: 'InvalidLogoutToken', reason: 'replay' }, '355 s later its iat still passes: refused as a replay')
  clock += 10_000
  await t.rejects(verify(token), { name: 'InvalidLogoutToken', reason: 'iat' }, 'past the window: refused by its age')
})

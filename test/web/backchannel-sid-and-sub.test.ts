import t from 'tap'
import { randomUUID } from 'node:crypto'
import { buildTestApp, type TestApp } from '../helpers/app.js'
import { BACKCHANNEL_LOGOUT_EVENT } from '../../src/web/backchannel.js'

/**
 * OpenID Connect Back-Channel Logout 1.0, 2.7: the RP ends "the session(s) identified by the iss
 * and sub Claims and/or the sid Claim". A logout token naming both identifies that subject's IdP
 * session: a session under the same sid but another subject is not the one it names (Duende BFF
 * filters on both, as well). Its ID tokens are not refused either.
 */

const EVENTS = { [BACKCHANNEL_LOGOUT_EVENT]: {} }
const WEB_CLIENT = { OIDC_CLIENT_SECRET: 'test-web-client-secret-0123456789', PUBLIC_URL: 'https://patient.example' }

async function signIn ({ app, issuer }: TestApp, claims: Record<string, unknown>): Promise<number | string> {
  const answer = await app.inject({ method: 'POST', url: '/auth/session', payload: { idToken: await issuer.sign(claims) } })
  return answer.statusCode === 201 ? answer.json().data.token as string : answer.statusCode
}

async function logout ({ app, issuer }: TestApp, claims: Record<string, unknown>): Promise<number> {
  const token = await issuer.sign({ ...claims, events: EVENTS, jti: randomUUID(), email: undefined, email_verified: undefined })
  const answer = await app.inject({
    method: 'POST',
    url: '/auth/backchannel-logout',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    payload: new URLSearchParams({ logout_token: token }).toString()
  })
  return answer.statusCode
}

async function live ({ app }: TestApp, bearer: number | string): Promise<boolean> {
  const answer = await app.inject({ url: '/auth/me', headers: { authorization: `Bearer ${String(bearer)}` } })
  return answer.json().data.authenticated as boolean
}

for (const store of ['memory', 'redis'] as const) {
  t.test(`${store} store: a logout token naming a sid and a sub ends that subject's sessions of that sid, no other subject's`, async (t) => {
    const built = await buildTestApp(t, { env: WEB_CLIENT, redis: store === 'redis' })
    const alice = await signIn(built, { sid: 'idp-sid-1', sub: 'patient-alice' })
    const bob = await signIn(built, { sid: 'idp-sid-1', sub: 'patient-bob' })
    t.type(alice, 'string')
    t.type(bob, 'string')

    t.equal(await logout(built, { sid: 'idp-sid-1', sub: 'patient-bob' }), 200)
    t.notOk(await live(built, bob), "bob's session of that sid is ended")
    t.equal(await signIn(built, { sid: 'idp-sid-1', sub: 'patient-bob' }), 401, "bob's ID tokens of that sid are refused")
    t.ok(await live(built, alice), "alice's session under the same sid is not the one the token names")
    t.type(await signIn(built, { sid: 'idp-sid-1', sub: 'patient-alice' }), 'string', "alice's ID tokens of that sid still sign in")

    // A sid alone still ends every session of that sid, whoever's.
    t.equal(await logout(built, { sid: 'idp-sid-1', sub: undefined }), 200)
    t.notOk(await live(built, alice), 'a logout by sid alone ends it')
    t.equal(await signIn(built, { sid: 'idp-sid-1', sub: 'patient-alice' }), 401, 'and refuses the tokens of that sid')
  })
}

// A `sid` or `sub` that is there but is not a non-empty string names nothing, and the token is
// read without it: the logout widens (by subject instead of by IdP session, or to every session
// of the sid instead of one subject's), never narrows to none. The token is the IdP's, signed: a
// malformed claim is its bug, and ending more sessions is the safe side of it, where refusing the
// token would leave alive the sessions it meant to end.
for (const [claim, value] of [['sid', 42], ['sid', ''], ['sid', ['idp-sid-1']], ['sid', null], ['sub', 7], ['sub', ''], ['sub', { id: 'patient-bob' }]] as const) {
  t.test(`a logout token whose ${claim} is ${JSON.stringify(value)} is read without it: the logout widens`, async (t) => {
    const built = await buildTestApp(t, { env: WEB_CLIENT })
    const first = await signIn(built, { sid: 'idp-sid-1', sub: 'patient-alice' })
    const second = await signIn(built, { sid: 'idp-sid-2', sub: 'patient-alice' })
    const bob = await signIn(built, { sid: 'idp-sid-1', sub: 'patient-bob' })
    const carol = await signIn(built, { sid: 'idp-sid-3', sub: 'patient-carol' })
    if (claim === 'sid') {
      t.equal(await logout(built, { sid: value, sub: 'patient-alice' }), 200)
      t.notOk(await live(built, first), "alice's session of idp-sid-1 ended")
      t.notOk(await live(built, second), 'and of idp-sid-2: by subject')
      t.ok(await live(built, bob), "bob's lives on")
    } else {
      t.equal(await logout(built, { sid: 'idp-sid-1', sub: value }), 200)
      t.notOk(await live(built, first), "alice's session of idp-sid-1 ended")
      t.notOk(await live(built, bob), "and bob's: every session of the sid")
      t.ok(await live(built, second), "alice's session of another sid lives on")
    }
    t.ok(await live(built, carol), "carol's lives on")
  })
}

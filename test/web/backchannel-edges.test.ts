import t from 'tap'
import { randomUUID } from 'node:crypto'
import { Browser } from './browser.js'
import { SESSION_COOKIE, startWebStack, type WebStack } from './stack.js'
import { BACKCHANNEL_LOGOUT_EVENT } from '../../src/web/backchannel.js'

const EVENTS = { [BACKCHANNEL_LOGOUT_EVENT]: {} }

async function authenticated (app: WebStack['app'], cookie: string | undefined): Promise<boolean> {
  const answer = await app.inject({ method: 'GET', url: '/auth/me', cookies: { [SESSION_COOKIE]: cookie ?? '' } })
  return (answer.json() as { data: { authenticated: boolean } }).data.authenticated
}

function post (app: WebStack['app'], body: string) {
  return app.inject({ method: 'POST', url: '/auth/backchannel-logout', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: body })
}

const form = (token: string): string => new URLSearchParams({ logout_token: token }).toString()

t.test('logout tokens: the edges the spec test does not reach', async (t) => {
  const stack = await startWebStack(t)
  const browser = new Browser()
  await stack.signIn(browser, 'bob@example.com')
  const cookie = stack.sessionOf(browser)
  const alice = new Browser()
  await stack.signIn(alice, 'alice@example.com')
  const now = Math.floor(Date.now() / 1000)

  // Kills MAX_AGE_SEC 300 -> 600 (src/web/backchannel.ts): 400 s old is past 300 s + 30 s tolerance.
  const stale = await stack.signAsIdp({ sub: 'patient-bob', events: EVENTS, iat: now - 400, exp: now + 60 })
  t.equal((await post(stack.app, form(stale))).statusCode, 400, 'issued 400 s ago → 400')
  t.ok(await authenticated(stack.app, cookie), 'and no session ended')

  // Kills `tokens.length === 1` -> `>= 1` (src/web/backchannel.ts, parseForm): a valid token
  // repeated (or followed by another) is ambiguous and refused, not the first one taken.
  const valid = await stack.signAsIdp({ sub: 'patient-bob', events: EVENTS })
  t.equal((await post(stack.app, `${form(valid)}&logout_token=x`)).statusCode, 400, 'a valid token and another → 400')
  t.ok(await authenticated(stack.app, cookie), 'and no session ended')

  // Kills dropping `|| token.length > MAX_TOKEN_LENGTH` (src/web/backchannel.ts,
  // backchannelLogout): a token over 8192 characters is refused before any verification, however
  // well signed.
  let pad = 6000
  let long = ''
  while (long.length <= 8192) {
    long = await stack.signAsIdp({ sub: 'patient-bob', events: EVENTS, pad: 'x'.repeat(pad) })
    pad += 100
  }
  t.ok(long.length < 9100, `a signed token of ${long.length} characters, within the form's body limit`)
  t.equal((await post(stack.app, form(long))).statusCode, 400, 'over 8192 characters → 400')
  t.ok(await authenticated(stack.app, cookie), 'and no session ended')

  // Kills dropping 'iat' from the required claims (src/web/backchannel.ts, the verification's requiredClaims): without it the
  // age check compares undefined and passes, and a token the replay guard has forgotten would do.
  const undated = await stack.signAsIdp({ sub: 'patient-bob', events: EVENTS, iat: undefined })
  t.equal((await post(stack.app, form(undated))).statusCode, 400, 'no iat → 400')
  // Kills `value !== ''` dropped from stringClaim (src/web/backchannel.ts, stringClaim): an empty jti is none.
  const emptyJti = await stack.signAsIdp({ sub: 'patient-bob', events: EVENTS, jti: '' })
  t.equal((await post(stack.app, form(emptyJti))).statusCode, 400, 'an empty jti → 400')
  t.ok(await authenticated(stack.app, cookie), 'and no session ended')

  // ...and an empty sid names no IdP session: the token ends the subject's sessions, as one
  // without a sid does (not those of an IdP session '', which are none).
  const emptySid = await stack.signAsIdp({ sub: 'patient-alice', sid: '', events: EVENTS })
  t.equal((await post(stack.app, form(emptySid))).statusCode, 200, 'an empty sid with a sub → 200')
  t.notOk(await authenticated(stack.app, stack.sessionOf(alice)), "alice's session ended by subject")
  t.ok(await authenticated(stack.app, cookie), "bob's did not")

  t.equal((await post(stack.app, form(valid))).statusCode, 200, 'the same token alone is carried out')
  t.notOk(await authenticated(stack.app, cookie))

  // Kills `token.length > MAX_TOKEN_LENGTH` -> `>=` (src/web/backchannel.ts, the route's length check): a token of
  // exactly 8192 characters is within the limit. (Base64url never makes a segment of 4k + 1
  // characters: the header's typ varies the other segment's length.)
  const sign = async (length: number, header: Record<string, unknown>): Promise<string> =>
    await stack.signAsIdp({ sub: 'patient-bob', events: EVENTS, pad: 'x'.repeat(length), jti: randomUUID() }, header)
  // Four characters of token per three of pad: start a little short of 8192 and step up.
  const start = 5000 + Math.floor((8192 - (await sign(5000, {})).length) * 3 / 4) - 10
  let exact = ''
  for (let length = start; exact === '' && length < start + 30; length++) {
    for (const header of [{}, { typ: 'JWT' }, { typ: 'logout+jwt' }]) {
      const candidate = await sign(length, header)
      if (candidate.length === 8192) {
        exact = candidate
        break
      }
    }
  }
  t.equal(exact.length, 8192, 'a signed token of exactly 8192 characters')
  t.equal((await post(stack.app, form(exact))).statusCode, 200, 'exactly 8192 characters → carried out')
})

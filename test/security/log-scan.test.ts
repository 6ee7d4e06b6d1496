import t from 'tap'
import { buildTestApp, signIn } from '../helpers/app.js'
import { leaksIn, rememberRequestSecrets, rememberSecret, secretsKnown } from '../helpers/secrets.js'

/** The suite-wide log scan (helpers/secrets.ts) finds what it must, and only that. */

const line = (fields: Record<string, unknown>): string => `${JSON.stringify({ level: 30, msg: 'a line', ...fields })}\n`

t.test('finds a remembered secret as written and as JSON escapes it, naming its kind and never its value', async (t) => {
  rememberSecret('probe reason', 'Ça va "mieux" merci')
  t.same(leaksIn([line({ note: 'nothing here' })]), [])
  const found = leaksIn([line({ note: 'told: Ça va "mieux" merci' })])
  t.same(found, ['a probe reason in a line "a line"'])
  t.notOk(found.join().includes('mieux'), 'the report does not repeat the secret')
  t.same(leaksIn([line({ note: 'ÇA VA "MIEUX" MERCI' })]).length, 1, 'in any case')
})

t.test('a field named like a secret holds only the censor\'s mark', async (t) => {
  t.same(leaksIn([line({ reason: '[redacted]', req: { headers: { authorization: '[redacted]' } } })]), [])
  t.same(leaksIn([line({ req: { headers: { cookie: 'a=b' } }, email: 'x@example.com' })]), [
    'an uncensored req.headers.cookie in a line "a line"',
    'an uncensored email in a line "a line"'
  ])
  t.same(leaksIn(['not json\n']), ['a line that is not JSON (8 characters)'])
})

t.test('values too short or too plain to mean anything are not looked for', async (t) => {
  const before = secretsKnown()
  for (const value of ['ok', 'x'.repeat(500), 'A'.repeat(43), 42, null]) rememberSecret('probe', value)
  t.equal(secretsKnown(), before)
  rememberRequestSecrets({ headers: { authorization: 'Bearer probe-token-123456', cookie: 'a=probe-cookie-1; b=x' }, cookies: { c: 'probe-cookie-2' }, payload: '{"reason":"probe reason 3"}' })
  rememberRequestSecrets({ payload: 'not json' })
  rememberRequestSecrets(undefined)
  t.equal(secretsKnown(), before + 4, 'a request\'s bearer token, cookies and reason')
})

t.test('an app built for a test feeds the scan with what it hands out', async (t) => {
  const before = secretsKnown()
  const { app, issuer } = await buildTestApp(t)
  const token = await signIn(app, issuer, 'log-scan-probe@example.com')
  t.ok(secretsKnown() >= before + 3, 'the organization key, the ID token, the session token and the email')
  // The app logs at debug here: its lines are scanned when it closes (the teardown fails the test).
  t.equal((await app.inject({ url: '/auth/me', headers: { authorization: `Bearer ${token}` } })).statusCode, 200)
})

import t from 'tap'
import { Writable } from 'node:stream'
import { buildTestApp } from '../helpers/app.js'
import { SANDBOX_KEY, startSandbox } from '../helpers/sandbox.js'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'

/**
 * A full mobile flow, every log line captured at debug level: nothing secret or personal may
 * appear in any of them (the key, tokens, the ID token, the email, the reason, the key header).
 */
t.test('a full flow logs no secret and no personal data', async (t) => {
  const alice = DEMO_PATIENTS[0]!
  const lines: string[] = []
  const logStream = new Writable({ write (chunk, _encoding, done) { lines.push(chunk.toString()); done() } })
  const sandbox = await startSandbox(t)
  const { app, issuer } = await buildTestApp(t, {
    upstreamUrl: sandbox.url,
    logStream,
    env: { CV_API_KEY: SANDBOX_KEY, LOG_LEVEL: 'debug', CV_TIMEOUT_MS: '300' }
  })
  const idToken = await issuer.sign({ email: alice.email, sub: 'sub-alice' })
  const session = await app.inject({ method: 'POST', url: '/auth/session', payload: { idToken } })
  t.equal(session.statusCode, 201)
  const token = session.json().data.token as string
  const auth = { authorization: `Bearer ${token}` }
  const reason = 'Sensitive: my symptoms improved'
  const idempotencyKey = 'idem-key-private-123'

  t.equal((await app.inject({ url: '/auth/me', headers: auth })).statusCode, 200)
  t.equal((await app.inject({ url: '/appointments', headers: auth })).statusCode, 200)
  const cancelUrl = `/appointments/${alice.appointments[0]!.id}/cancel`
  const first = await app.inject({ method: 'POST', url: cancelUrl, headers: { ...auth, 'idempotency-key': idempotencyKey }, payload: { reason } })
  t.equal(first.statusCode, 200)
  const replay = await app.inject({ method: 'POST', url: cancelUrl, headers: { ...auth, 'idempotency-key': idempotencyKey }, payload: { reason } })
  t.equal(replay.headers['idempotent-replayed'], 'true')
  // Failures log too: an upstream error, a rejected body, a bad token, a bad ID token.
  sandbox.control.setFailure({ kind: 'status', status: 500, endpoint: 'cancel', times: 1 })
  t.equal((await app.inject({ method: 'POST', url: `/appointments/${alice.appointments[1]!.id}/cancel`, headers: auth, payload: { reason } })).statusCode, 502)
  t.equal((await app.inject({ method: 'POST', url: cancelUrl, headers: auth, payload: { reason, email: alice.email } })).statusCode, 400)
  t.equal((await app.inject({ url: '/appointments', headers: { authorization: `Bearer ${token.slice(0, -2)}xx` } })).statusCode, 401)
  const badIdToken = await issuer.sign({ email: alice.email, email_verified: false })
  t.equal((await app.inject({ method: 'POST', url: '/auth/session', payload: { idToken: badIdToken } })).statusCode, 401)
  t.equal((await app.inject({ method: 'POST', url: '/auth/logout', headers: auth })).statusCode, 200)
  t.equal((await app.inject({ url: '/appointments', headers: auth })).statusCode, 401)

  t.ok(lines.length > 10, 'the flow was logged')
  const all = lines.join('')
  const secrets = {
    'API key': SANDBOX_KEY,
    'session token': token,
    'ID token': idToken,
    'ID token signature': idToken.split('.')[2]!,
    email: alice.email,
    'email (any case)': alice.email.toUpperCase(),
    reason,
    'idempotency key': idempotencyKey
  }
  for (const [what, value] of Object.entries(secrets)) {
    t.notOk(all.toLowerCase().includes(value.toLowerCase()), `no ${what} in the logs`)
  }
  for (const line of lines) JSON.parse(line)
  t.ok(lines.some((line) => line.includes('"audit"')), 'the audit record is there')
})

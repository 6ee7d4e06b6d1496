import { setTimeout as sleep } from 'node:timers/promises'
import t, { type Test } from 'tap'
import { Writable } from 'node:stream'
import { buildTestApp, signIn } from '../helpers/app.js'
import { SANDBOX_KEY, startSandbox } from '../helpers/sandbox.js'
import { startRedis } from '../helpers/redis.js'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'
import type { SandboxOptions } from '../../src/care360/sandbox.js'
import { BODY_LIMIT_BYTES } from '../../src/app.js'

const alice = DEMO_PATIENTS[0]!
const bob = DEMO_PATIENTS[1]!
const aliceFirst = alice.appointments[0]!
const bobFirst = bob.appointments[0]!

interface StackOptions { env?: Record<string, string>, sandbox?: Partial<SandboxOptions>, redis?: boolean, logs?: string[] }

async function stack (t: Test, options: StackOptions = {}) {
  const sandbox = await startSandbox(t, options.sandbox)
  const logStream = options.logs === undefined
    ? undefined
    : new Writable({ write (chunk, _encoding, done) { options.logs!.push(chunk.toString()); done() } })
  const { app, issuer } = await buildTestApp(t, {
    upstreamUrl: sandbox.url,
    env: { CV_API_KEY: SANDBOX_KEY, CV_TIMEOUT_MS: '1000', RATE_LIMIT_CANCEL: '1000/1m', RATE_LIMIT_SESSION: '1000/1m', ...options.env },
    ...(options.redis === true ? { redis: true } : {}),
    ...(logStream === undefined ? {} : { logStream })
  })
  const tokenFor = async (email: string) => await signIn(app, issuer, email)
  const cancel = async (token: string, id: string, payload?: unknown, headers: Record<string, string> = {}) =>
    await app.inject({
      method: 'POST',
      url: `/appointments/${id}/cancel`,
      headers: { authorization: `Bearer ${token}`, ...headers },
      ...(payload === undefined ? {} : { payload: payload as Record<string, unknown> })
    })
  const cancelCalls = () => sandbox.control.calls.filter((call) => call.method === 'POST')
  return { app, sandbox, tokenFor, cancel, cancelCalls }
}

t.test('a cancel reaches the upstream with the key, the session email, the id and the reason only', async (t) => {
  const { sandbox, tokenFor, cancel, cancelCalls } = await stack(t)
  const token = await tokenFor(alice.email)
  const res = await cancel(token, aliceFirst.id, { reason: 'Feeling better' }, {
    'x-request-id': 'req-cancel-1', cookie: 'other=1', 'x-forwarded-for': '1.2.3.4', 'user-agent': 'patient-app'
  })
  t.equal(res.statusCode, 200)
  t.same(res.json(), { status: 200, success: true, message: 'Meeting cancelled successfully' })
  t.equal(res.headers['x-request-id'], 'req-cancel-1')
  t.equal(res.headers['cache-control'], 'no-store')
  const [call] = cancelCalls()
  t.same(call?.body, { email: alice.email, appointmentId: aliceFirst.id, reason: 'Feeling better' })
  t.equal(call?.headers['cv-api-key'], SANDBOX_KEY)
  t.equal(call?.headers['x-request-id'], 'req-cancel-1')
  t.match(call?.headers['content-type'], /^application\/json/)
  for (const name of ['authorization', 'cookie', 'x-forwarded-for', 'user-agent']) {
    t.equal(call?.headers[name], undefined, `${name} is not forwarded`)
  }
  t.ok(sandbox.control.isCancelled(aliceFirst.id))
})

t.test('no body, an empty JSON body and an agentEventId all cancel', async (t) => {
  const { tokenFor, cancel, cancelCalls } = await stack(t)
  const token = await tokenFor(alice.email)
  t.equal((await cancel(token, alice.appointments[0]!.id)).statusCode, 200)
  const empty = await cancel(token, alice.appointments[1]!.id, '', { 'content-type': 'application/json' })
  t.equal(empty.statusCode, 200)
  const byAgentEventId = await cancel(token, alice.appointments[2]!.agentEventId, {})
  t.equal(byAgentEventId.statusCode, 200)
  t.same(cancelCalls().map((call) => call.body), [
    { email: alice.email, appointmentId: alice.appointments[0]!.id },
    { email: alice.email, appointmentId: alice.appointments[1]!.id },
    { email: alice.email, appointmentId: alice.appointments[2]!.agentEventId }
  ])
})

t.test('no body under another type (curl -d \'\', fetch with body \'\'): no body is fine; a body under it is 415', async (t) => {
  const { tokenFor, cancel, cancelCalls } = await stack(t)
  const token = await tokenFor(bob.email)
  t.equal((await cancel(token, bob.appointments[0]!.id, '', { 'content-type': 'application/x-www-form-urlencoded' })).statusCode, 200)
  t.equal((await cancel(token, bob.appointments[1]!.id, '', { 'content-type': 'text/plain;charset=UTF-8' })).statusCode, 200)
  const refused = await cancel(token, bob.appointments[2]!.id, 'reason=x', { 'content-type': 'application/x-www-form-urlencoded' })
  t.equal(refused.statusCode, 415)
  t.match(refused.json(), { code: 'UNSUPPORTED_MEDIA_TYPE' })
  t.same(cancelCalls().map((call) => call.body), [
    { email: bob.email, appointmentId: bob.appointments[0]!.id },
    { email: bob.email, appointmentId: bob.appointments[1]!.id }
  ])
})

t.test("a patient can never cancel someone else's appointment", async (t) => {
  const { sandbox, tokenFor, cancel, cancelCalls } = await stack(t)
  const token = await tokenFor(alice.email)
  for (const id of [bobFirst.id, bobFirst.agentEventId, '00000000-0000-4000-8000-000000000000']) {
    const res = await cancel(token, id)
    t.equal(res.statusCode, 404)
    t.match(res.json(), { status: 404, success: false, code: 'APPOINTMENT_NOT_FOUND' })
  }
  t.equal(cancelCalls().length, 0, 'no cancel was sent')
  t.notOk(sandbox.control.isCancelled(bobFirst.id))
  const unknown = await cancel(await tokenFor('nobody@example.com'), aliceFirst.id)
  t.equal(unknown.statusCode, 404, 'an email the upstream does not know owns nothing')
  t.equal(cancelCalls().length, 0)
})

t.test('OWNERSHIP_CHECK=off forwards without the list call', async (t) => {
  const { sandbox, tokenFor, cancel } = await stack(t, { env: { OWNERSHIP_CHECK: 'off' } })
  const res = await cancel(await tokenFor(alice.email), bobFirst.id)
  t.equal(res.statusCode, 400, 'the sandbox itself refuses a foreign appointment')
  t.match(res.json(), { code: 'UPSTREAM_REJECTED' })
  t.same(sandbox.control.calls.map((call) => call.method), ['POST'])
})

t.test('OWNERSHIP_CHECK=off: the id goes in its canonical lower case; the upstream\'s NotFoundError is the contract\'s 404, replayed under its key', async (t) => {
  const { sandbox, tokenFor, cancel } = await stack(t, { env: { OWNERSHIP_CHECK: 'off' } })
  const token = await tokenFor(alice.email)
  const res = await cancel(token, aliceFirst.id.toUpperCase())
  t.equal(res.statusCode, 200, 'either case names the appointment (contract, step 4)')
  t.equal((sandbox.control.calls.at(-1)!.body as { appointmentId: string }).appointmentId, aliceFirst.id)

  sandbox.control.setFailure({ kind: 'status', status: 404, body: { status: 404, success: false, message: 'Appointment not found', error: 'NotFoundError' }, endpoint: 'cancel', times: 1 })
  const missing = await cancel(token, alice.appointments[1]!.id, {}, { 'idempotency-key': 'nf-1' })
  t.equal(missing.statusCode, 404)
  t.same(missing.json(), { status: 404, success: false, message: 'No such upcoming appointment', code: 'APPOINTMENT_NOT_FOUND' })
  const replay = await cancel(token, alice.appointments[1]!.id, {}, { 'idempotency-key': 'nf-1' })
  t.equal(replay.statusCode, 404)
  t.equal(replay.headers['idempotent-replayed'], 'true')
})

t.test('bad input: 4xx in the envelope, never an upstream call', async (t) => {
  const { sandbox, tokenFor, cancel } = await stack(t)
  const token = await tokenFor(alice.email)
  const cases: Array<[string, unknown, Record<string, string>, number, string]> = [
    ['not-a-uuid', undefined, {}, 400, 'VALIDATION_FAILED'],
    [`${aliceFirst.id}0`, undefined, {}, 400, 'VALIDATION_FAILED'],
    [aliceFirst.id, { reason: 'x'.repeat(501) }, {}, 400, 'VALIDATION_FAILED'],
    [aliceFirst.id, { reason: 'bell\u0007' }, {}, 400, 'VALIDATION_FAILED'],
    [aliceFirst.id, { reason: 'c1\u0085' }, {}, 400, 'VALIDATION_FAILED'],
    [aliceFirst.id, { reason: 42 }, {}, 400, 'VALIDATION_FAILED'],
    [aliceFirst.id, { reason: 'ok', email: 'bob@example.com' }, {}, 400, 'VALIDATION_FAILED'],
    [aliceFirst.id, { appointmentId: bobFirst.id }, {}, 400, 'VALIDATION_FAILED'],
    [aliceFirst.id, '[]', { 'content-type': 'application/json' }, 400, 'VALIDATION_FAILED'],
    [aliceFirst.id, 'null', { 'content-type': 'application/json' }, 400, 'VALIDATION_FAILED'],
    [aliceFirst.id, '{"reason":', { 'content-type': 'application/json' }, 400, 'VALIDATION_FAILED'],
    [aliceFirst.id, 'reason=x', { 'content-type': 'application/x-www-form-urlencoded' }, 415, 'UNSUPPORTED_MEDIA_TYPE'],
    [aliceFirst.id, 'x', { 'content-type': 'text/plain' }, 415, 'UNSUPPORTED_MEDIA_TYPE'],
    [aliceFirst.id, JSON.stringify({ reason: 'x'.repeat(BODY_LIMIT_BYTES) }), { 'content-type': 'application/json' }, 413, 'PAYLOAD_TOO_LARGE'],
    [aliceFirst.id, undefined, { 'idempotency-key': '' }, 400, 'VALIDATION_FAILED'],
    [aliceFirst.id, undefined, { 'idempotency-key': 'k'.repeat(256) }, 400, 'VALIDATION_FAILED'],
    [aliceFirst.id, undefined, { 'idempotency-key': 'has space' }, 400, 'VALIDATION_FAILED']
  ]
  for (const [id, payload, headers, status, code] of cases) {
    const res = await cancel(token, id, payload, headers)
    t.equal(res.statusCode, status, `${code}: ${JSON.stringify(payload)?.slice(0, 40)} ${JSON.stringify(headers)}`)
    t.match(res.json(), { status, success: false, code })
  }
  t.equal(sandbox.control.calls.length, 0, 'nothing reached the upstream')
  const longest = await cancel(token, aliceFirst.id, { reason: '😀'.repeat(500) + '' })
  t.equal(longest.statusCode, 200, '500 code points (1000 UTF-16 units) are allowed')
  // The same reason as Python's json.dumps writes it (ensure_ascii): 12 bytes a code point.
  const escaped = `{"reason":"${'\\ud83d\\ude00'.repeat(500)}"}`
  t.ok(Buffer.byteLength(escaped) > 6000)
  const written = await cancel(token, alice.appointments[1]!.id, escaped, { 'content-type': 'application/json' })
  t.equal(written.statusCode, 200, 'also written with escapes: within the body limit')
})

t.test('no session, an unknown or a malformed one: 401 and no upstream call', async (t) => {
  const { app, sandbox, cancel } = await stack(t)
  const none = await app.inject({ method: 'POST', url: `/appointments/${aliceFirst.id}/cancel` })
  t.equal(none.statusCode, 401)
  t.match(none.json(), { code: 'SESSION_REQUIRED' })
  t.equal(none.headers['www-authenticate'], 'Bearer', 'a 401 carries its challenge (RFC 9110, 15.5.2)')
  for (const token of ['x', 'A'.repeat(43)]) {
    const refused = await cancel(token, aliceFirst.id)
    t.equal(refused.statusCode, 401)
    t.equal(refused.headers['www-authenticate'], 'Bearer error="invalid_token"', 'a token sent and refused is named so (RFC 6750, 3.1)')
  }
  const cookieOnly = await app.inject({ method: 'GET', url: '/appointments', cookies: { '__Host-bff-session': 'A'.repeat(43) } })
  t.equal(cookieOnly.headers['www-authenticate'], 'Bearer', 'a refused cookie is no bearer token')
  t.equal((await cancel('A'.repeat(43), 'not-a-uuid')).statusCode, 401, 'auth is decided before validation')
  t.equal(sandbox.control.calls.length, 0)
})

t.test('every upstream outcome maps to a row of the answer table', async (t) => {
  const { sandbox, tokenFor, cancel } = await stack(t)
  const token = await tokenFor(alice.email)
  const rows: Array<[Parameters<typeof sandbox.control.setFailure>[0], number, string]> = [
    [{ kind: 'status', status: 400, body: { status: 400, success: false, message: 'Invalid request', error: 'appointment already started' } }, 400, 'UPSTREAM_REJECTED'],
    [{ kind: 'status', status: 401, body: { status: 401, success: false, message: 'Unauthorized' } }, 502, 'UPSTREAM_AUTH_FAILED'],
    [{ kind: 'status', status: 500, body: { status: 500, success: false, message: 'boom' } }, 502, 'UPSTREAM_ERROR'],
    [{ kind: 'status', status: 418, body: { status: 418 } }, 502, 'UPSTREAM_ERROR'],
    [{ kind: 'garbage' }, 502, 'UPSTREAM_ERROR'],
    [{ kind: 'huge' }, 502, 'UPSTREAM_ERROR'],
    [{ kind: 'reset' }, 502, 'UPSTREAM_ERROR'],
    [{ kind: 'slow', delayMs: 2500 }, 504, 'UPSTREAM_TIMEOUT'],
    [{ kind: 'rate-limited', retryAfter: '7' }, 429, 'UPSTREAM_RATE_LIMITED']
  ]
  sandbox.control.setFailure({ kind: 'status', status: 400, endpoint: 'cancel', times: 1, body: { status: 400, success: false, message: 'Invalid request', error: 'bad' } })
  const rejected = await cancel(token, alice.appointments[1]!.id)
  t.match(rejected.json(), { code: 'UPSTREAM_REJECTED', message: 'Invalid request', error: 'bad' }, "the upstream's message and error pass through")
  // The 429 row is last: it starts the shared cooldown.
  for (const [index, [failure, status, code]] of rows.entries()) {
    sandbox.control.setFailure({ ...failure, endpoint: 'cancel', times: 1 })
    // A distinct reason each time: identical cancels within moments share one upstream call.
    const res = await cancel(token, aliceFirst.id, { reason: `row ${index}` })
    t.equal(res.statusCode, status, `${failure.kind} ${'status' in failure ? failure.status : ''}`)
    t.match(res.json(), { status, success: false, code })
    if (status === 429) t.ok(Number(res.headers['retry-after']) >= 1)
    t.notMatch(res.body, SANDBOX_KEY)
    t.notMatch(res.body, alice.email)
  }
})

t.test('an unreachable upstream is 502 UPSTREAM_UNAVAILABLE', async (t) => {
  const { sandbox, tokenFor, cancel } = await stack(t, { env: { OWNERSHIP_CHECK: 'off' } })
  const token = await tokenFor(alice.email)
  await sandbox.close()
  const res = await cancel(token, aliceFirst.id)
  t.equal(res.statusCode, 502)
  t.match(res.json(), { code: 'UPSTREAM_UNAVAILABLE' })
})

t.test('GET /appointments lists the patient\'s own, trimmed', async (t) => {
  const { app, tokenFor, cancel } = await stack(t)
  const token = await tokenFor(alice.email)
  const res = await app.inject({ url: '/appointments', headers: { authorization: `Bearer ${token}` } })
  t.equal(res.statusCode, 200)
  const body = res.json()
  t.match(body, { status: 200, success: true })
  t.same(body.data.map((item: { id: string }) => item.id), alice.appointments.map((item) => item.id))
  t.same(Object.keys(body.data[0]).sort(), ['agentEventId', 'agentName', 'end', 'id', 'start', 'status', 'title', 'topic'])
  t.notMatch(res.body, 'description', 'fields a patient app does not need are dropped')
  await cancel(token, aliceFirst.id)
  const after = await app.inject({ url: '/appointments', headers: { authorization: `Bearer ${token}` } })
  t.equal(after.json().data.length, alice.appointments.length - 1)
  const stranger = await app.inject({ url: '/appointments', headers: { authorization: `Bearer ${await tokenFor('nobody@example.com')}` } })
  t.same(stranger.json().data, [], 'an email the upstream does not know gives an empty list')
  t.equal((await app.inject({ url: '/appointments' })).statusCode, 401)
})

t.test('the ownership list is cached briefly and a cancel refreshes it', async (t) => {
  const { app, sandbox, tokenFor, cancel } = await stack(t)
  const token = await tokenFor(alice.email)
  await app.inject({ url: '/appointments', headers: { authorization: `Bearer ${token}` } })
  t.equal((await cancel(token, alice.appointments[0]!.id)).statusCode, 200)
  t.same(sandbox.control.calls.map((call) => call.method), ['GET', 'POST'], 'the listed appointments served the ownership check')
  const doubleTap = await cancel(token, alice.appointments[0]!.id)
  t.equal(doubleTap.statusCode, 200, 'an identical cancel a moment later shares the first one\'s answer')
  t.equal(sandbox.control.calls.length, 2, 'without a second upstream call')
  t.equal((await cancel(token, alice.appointments[0]!.id, { reason: 'again' })).statusCode, 404, 'a cancelled appointment is no longer the patient\'s upcoming one')
  const seeded = sandbox.control.seedAppointment(alice.email)
  t.equal((await cancel(token, seeded.id)).statusCode, 200, 'an appointment booked after the list was cached is found fresh')
})

t.test('a cancel keeps the cached list warm for the next one, without the cancelled appointment', async (t) => {
  const { sandbox, tokenFor, cancel } = await stack(t)
  const token = await tokenFor(alice.email)
  t.equal((await cancel(token, alice.appointments[0]!.id)).statusCode, 200)
  t.equal((await cancel(token, alice.appointments[1]!.id)).statusCode, 200)
  t.same(sandbox.control.calls.map((call) => call.method), ['GET', 'POST', 'POST'], 'one list call for both cancels')
  t.equal((await cancel(token, alice.appointments[0]!.id, { reason: 'again' })).statusCode, 404, 'the cancelled one is not served from the cache')
  t.same(sandbox.control.calls.map((call) => call.method), ['GET', 'POST', 'POST', 'GET'], 'it was looked up fresh')
})

t.test('a cancel whose outcome is unknown drops the cached list: the next attempt looks the appointment up afresh', async (t) => {
  const { sandbox, tokenFor, cancel, cancelCalls } = await stack(t)
  const token = await tokenFor(alice.email)
  sandbox.control.setFailure({ kind: 'reset-after-apply', endpoint: 'cancel', times: 1 })
  const lost = await cancel(token, aliceFirst.id, { reason: 'first try' })
  t.equal(lost.statusCode, 502)
  t.ok(sandbox.control.isCancelled(aliceFirst.id), 'the upstream applied it before the answer was lost')
  // No Idempotency-Key and another reason: nothing shares the first attempt's outcome.
  const again = await cancel(token, aliceFirst.id, { reason: 'second try' })
  t.equal(again.statusCode, 404)
  t.match(again.json(), { code: 'APPOINTMENT_NOT_FOUND' })
  t.same(sandbox.control.calls.map((call) => call.method), ['GET', 'POST', 'GET'], 'a fresh list, not the cached one')
  t.equal(cancelCalls().length, 1, 'the cancel was not sent again')
})

t.test('with SERVICE_SECRET, Idempotency-Key records and patient hashes outlive a rotation of the org key', async (t) => {
  const sandbox = await startSandbox(t)
  const redis = await startRedis(t)
  const secret = 's'.repeat(16) + 'e'.repeat(16)
  async function replica (env: Record<string, string>) {
    const { app, issuer } = await buildTestApp(t, { upstreamUrl: sandbox.url, redis, env: { CV_TIMEOUT_MS: '1000', ...env } })
    const token = await signIn(app, issuer, alice.email)
    return {
      app,
      cancel: async (key: string) => await app.inject({
        method: 'POST', url: `/appointments/${aliceFirst.id}/cancel`, payload: { reason: 'r' }, headers: { authorization: `Bearer ${token}`, 'idempotency-key': key }
      })
    }
  }
  const before = await replica({ CV_API_KEY: SANDBOX_KEY, SERVICE_SECRET: secret })
  t.equal((await before.cancel('key-1')).statusCode, 200)
  // The org key is rotated (the new one never reaches the sandbox: a replay makes no upstream call).
  const after = await replica({ CV_API_KEY: 'rotated-org-key-0123456789', SERVICE_SECRET: secret })
  const replayed = await after.cancel('key-1')
  t.equal(replayed.statusCode, 200)
  t.equal(replayed.headers['idempotent-replayed'], 'true')
  t.equal(sandbox.control.calls.filter((call) => call.method === 'POST').length, 1, 'the cancel was sent once')
  t.equal(after.app.patientRef(alice.email), before.app.patientRef(alice.email), 'logs still correlate the patient')
  // Without SERVICE_SECRET the keys derive from the org key, and its rotation re-keys them.
  const fromKey = await buildTestApp(t, { upstreamUrl: sandbox.url, env: { CV_API_KEY: SANDBOX_KEY } })
  const fromRotated = await buildTestApp(t, { upstreamUrl: sandbox.url, env: { CV_API_KEY: 'rotated-org-key-0123456789' } })
  t.not(fromRotated.app.patientRef(alice.email), fromKey.app.patientRef(alice.email))
  t.not(fromKey.app.patientRef(alice.email), before.app.patientRef(alice.email), 'the secret, not the key, when both are set')
})

t.test('Idempotency-Key replays the first answer without a second upstream call', async (t) => {
  const { tokenFor, cancel, cancelCalls } = await stack(t)
  const token = await tokenFor(alice.email)
  const first = await cancel(token, aliceFirst.id, { reason: 'r' }, { 'idempotency-key': 'key-1' })
  const again = await cancel(token, aliceFirst.id, { reason: 'r' }, { 'idempotency-key': 'key-1' })
  t.equal(first.statusCode, 200)
  t.equal(again.statusCode, 200)
  t.same(again.json(), first.json())
  t.equal(again.headers['idempotent-replayed'], 'true')
  t.equal(cancelCalls().length, 1)
  const mismatch = await cancel(token, aliceFirst.id, {}, { 'idempotency-key': 'key-1' })
  t.equal(mismatch.statusCode, 422)
  t.match(mismatch.json(), { code: 'IDEMPOTENCY_MISMATCH' })
  const notFound = await cancel(token, bobFirst.id, {}, { 'idempotency-key': 'key-2' })
  const notFoundAgain = await cancel(token, bobFirst.id, {}, { 'idempotency-key': 'key-2' })
  t.equal(notFoundAgain.statusCode, 404)
  t.match(notFoundAgain.json(), { code: 'APPOINTMENT_NOT_FOUND' })
  t.same(notFoundAgain.json(), notFound.json())
  const bobToken = await tokenFor(bob.email)
  const bobs = await cancel(bobToken, bobFirst.id, { reason: 'r' }, { 'idempotency-key': 'key-1' })
  t.equal(bobs.statusCode, 200, "one patient's key never replays another's answer")
  t.equal(bobs.headers['idempotent-replayed'], undefined)
})

t.test('an Idempotency-Key record holds neither the reason nor the email, whatever spelling the upstream quoted them in', async (t) => {
  // README: a record keeps "only what a replay needs ... never the reason, the email or the raw
  // key". The stored envelope is the upstream's 400 as passed through (client.ts safeText), which
  // redacts the reason and the email as written only: echoed percent-encoded or inside a JSON body
  // quoted as text, they reach the patient's answer, are kept in Redis for 24 h and replayed.
  const { app, sandbox, tokenFor, cancel } = await stack(t, { redis: true })
  const token = await tokenFor(alice.email)
  const reason = 'Chemo "round 3" moved\nsorry'
  const sent = JSON.stringify({ email: alice.email, appointmentId: aliceFirst.id, reason })
  sandbox.control.setFailure({
    kind: 'status',
    status: 400,
    endpoint: 'cancel',
    body: { status: 400, success: false, message: `Invalid request: ${sent}`, error: `reason=${encodeURIComponent(reason)}&email=${encodeURIComponent(alice.email)}` },
    times: 1
  })
  const first = await cancel(token, aliceFirst.id, { reason }, { 'idempotency-key': 'echoed-1' })
  const replay = await cancel(token, aliceFirst.id, { reason }, { 'idempotency-key': 'echoed-1' })
  t.equal(first.statusCode, 400)
  t.equal(replay.headers['idempotent-replayed'], 'true')
  const redis = app.sharedState.redis!
  const stored: string[] = []
  for (const key of await redis.keys('idem:*')) stored.push(JSON.stringify(await redis.hgetall(key)))
  t.ok(stored.length > 0, 'the record is there')
  const spellings = (value: string): string[] => [...new Set([value, encodeURIComponent(value), JSON.stringify(value).slice(1, -1)])]
  for (const [where, text] of [['the answer', `${first.json().message as string} ${first.json().error as string}`], ['the Redis record', stored.map((record) => JSON.parse(record) as Record<string, string>).map((record) => Object.values(record).join(' ')).join(' ')]] as const) {
    for (const [what, value] of [['reason', reason], ['email', alice.email]] as const) {
      // The record's body is JSON text itself: the spellings as they read inside it too.
      const found = [...new Set(spellings(value).flatMap((spelling) => [spelling, JSON.stringify(spelling).slice(1, -1)]))].filter((spelling) => text.toLowerCase().includes(spelling.toLowerCase()))
      t.same(found, [], `no ${what} in ${where}`)
    }
  }
})

t.test('a lost answer is resolved from the upstream on retry with the same key', async (t) => {
  const { sandbox, tokenFor, cancel, cancelCalls } = await stack(t)
  const token = await tokenFor(alice.email)
  sandbox.control.setFailure({ kind: 'reset-after-apply', endpoint: 'cancel', times: 1 })
  const lost = await cancel(token, aliceFirst.id, {}, { 'idempotency-key': 'lost-1' })
  t.equal(lost.statusCode, 502)
  t.ok(sandbox.control.isCancelled(aliceFirst.id))
  const retry = await cancel(token, aliceFirst.id, {}, { 'idempotency-key': 'lost-1' })
  t.equal(retry.statusCode, 200)
  t.match(retry.json().message, /confirmed/)
  t.equal(cancelCalls().length, 1, 'the cancel the upstream already applied is not sent again')

  const second = alice.appointments[1]!
  sandbox.control.setFailure({ kind: 'reset', endpoint: 'cancel', times: 1 })
  t.equal((await cancel(token, second.id, {}, { 'idempotency-key': 'lost-2' })).statusCode, 502)
  t.notOk(sandbox.control.isCancelled(second.id))
  const resend = await cancel(token, second.id, {}, { 'idempotency-key': 'lost-2' })
  t.equal(resend.statusCode, 200)
  t.ok(sandbox.control.isCancelled(second.id), 'the cancel that never took effect is sent now, once')
  t.equal(cancelCalls().length, 3)
})

t.test('a lost answer for an appointment that has ended since is never confirmed: it is no longer upcoming', async (t) => {
  const { sandbox, tokenFor, cancel, cancelCalls } = await stack(t)
  const token = await tokenFor(alice.email)
  const ending = sandbox.control.seedAppointment(alice.email, { start: new Date(Date.now() - 60_000).toISOString(), end: new Date(Date.now() + 1500).toISOString() })
  // Sent, never applied, its answer lost: the outcome is unknown.
  sandbox.control.setFailure({ kind: 'reset', endpoint: 'cancel', times: 1 })
  t.equal((await cancel(token, ending.id, {}, { 'idempotency-key': 'ended-1' })).statusCode, 502)
  t.notOk(sandbox.control.isCancelled(ending.id))
  await sleep(Math.max(0, Date.parse(ending.end) - Date.now()) + 100)
  // The appointment is absent from the list now because it ended, which proves nothing.
  const retry = await cancel(token, ending.id, {}, { 'idempotency-key': 'ended-1' })
  t.equal(retry.statusCode, 404, 'not a 200 "confirmed" for a cancel that never happened')
  t.match(retry.json(), { code: 'APPOINTMENT_NOT_FOUND' })
  t.equal(cancelCalls().length, 1, 'and nothing sent for an appointment that is over')
})

t.test('an owned appointment listed without a readable end: the key\'s record knows none, and the cancel goes as usual', async (t) => {
  const { sandbox, tokenFor, cancel, cancelCalls } = await stack(t)
  const token = await tokenFor(alice.email)
  const undated = '6a1e0f3c-2b4d-4e8f-9a7b-5c3d2e1f0a9b'
  sandbox.control.setFailure({ kind: 'status', status: 200, endpoint: 'list', body: { status: 200, success: true, data: [{ id: undated, end: 'soon' }] }, times: 1 })
  const answer = await cancel(token, undated, {}, { 'idempotency-key': 'undated-1' })
  t.equal(answer.statusCode, 400, 'owned by the list, so sent; the sandbox does not know it')
  t.match(answer.json(), { code: 'UPSTREAM_REJECTED' })
  t.equal(cancelCalls().length, 1)
})

t.test('an upstream 401 (our key refused) is the key\'s answer, replayed as the contract says', async (t) => {
  const { sandbox, tokenFor, cancel, cancelCalls } = await stack(t)
  const token = await tokenFor(alice.email)
  sandbox.control.setFailure({ kind: 'status', status: 401, body: { status: 401, success: false, message: 'Unauthorized' }, endpoint: 'cancel', times: 1 })
  const refused = await cancel(token, aliceFirst.id, {}, { 'idempotency-key': 'key-401' })
  t.equal(refused.statusCode, 502)
  t.match(refused.json(), { code: 'UPSTREAM_AUTH_FAILED' })
  const retry = await cancel(token, aliceFirst.id, {}, { 'idempotency-key': 'key-401' })
  t.equal(retry.statusCode, 502)
  t.equal(retry.headers['idempotent-replayed'], 'true', 'an upstream answer: replayed, not sent again')
  t.equal(cancelCalls().length, 1)
  t.equal((await cancel(token, aliceFirst.id, {}, { 'idempotency-key': 'key-401b' })).statusCode, 200, 'a new key (a new action) runs')
})

t.test('with OWNERSHIP_CHECK=off a lost answer is never confirmed from the list: the cancel is sent again and the upstream answers', async (t) => {
  const { sandbox, tokenFor, cancel, cancelCalls } = await stack(t, { env: { OWNERSHIP_CHECK: 'off' } })
  const token = await tokenFor(alice.email)
  // Bob's appointment was never in Alice's list: its absence from it proves nothing. The
  // connection is lost after the cancel was sent: its outcome is unknown.
  sandbox.control.setFailure({ kind: 'reset', endpoint: 'cancel', times: 1 })
  t.equal((await cancel(token, bobFirst.id, {}, { 'idempotency-key': 'off-1' })).statusCode, 502)
  const retry = await cancel(token, bobFirst.id, {}, { 'idempotency-key': 'off-1' })
  t.equal(retry.statusCode, 400, 'not a 200 "confirmed" for a cancel that never happened')
  t.match(retry.json(), { code: 'UPSTREAM_REJECTED' })
  t.notOk(sandbox.control.isCancelled(bobFirst.id))
  t.equal(cancelCalls().length, 2, 'the upstream was asked again')
  t.equal((await cancel(token, bobFirst.id, {}, { 'idempotency-key': 'off-1' })).headers['idempotent-replayed'], 'true', 'and its answer is the key\'s')

  // Alice's own, applied before the answer was lost: the upstream says so.
  sandbox.control.setFailure({ kind: 'reset-after-apply', endpoint: 'cancel', times: 1 })
  t.equal((await cancel(token, aliceFirst.id, {}, { 'idempotency-key': 'off-2' })).statusCode, 502)
  t.ok(sandbox.control.isCancelled(aliceFirst.id))
  const again = await cancel(token, aliceFirst.id, {}, { 'idempotency-key': 'off-2' })
  t.equal(again.statusCode, 400)
  t.match(again.json(), { code: 'UPSTREAM_REJECTED' })
  t.equal(cancelCalls().length, 4)
})

t.test('LOG_LEVEL above info drops access lines but keeps the audit records', async (t) => {
  const logs: string[] = []
  const { app, tokenFor, cancel } = await stack(t, { logs, env: { LOG_LEVEL: 'warn' } })
  const token = await tokenFor(alice.email)
  t.equal((await cancel(token, aliceFirst.id, { reason: 'r' })).statusCode, 200)
  t.equal((await cancel(token, bobFirst.id)).statusCode, 404)
  t.equal((await app.inject({ url: '/healthz' })).statusCode, 200)
  const lines = logs.map((line) => JSON.parse(line) as { level: number, audit?: { outcome: string }, req?: { url: string } })
  t.same(lines.map((line) => line.audit?.outcome), ['cancelled', 'APPOINTMENT_NOT_FOUND'], 'one audit record per cancel attempt, and no other access line')
  t.ok(lines.every((line) => line.level === 30), 'at info, as at any level')
})

t.test('LOG_LEVEL silent drops every line, the audit records too', async (t) => {
  const logs: string[] = []
  const { tokenFor, cancel } = await stack(t, { logs, env: { LOG_LEVEL: 'silent' } })
  const token = await tokenFor(alice.email)
  t.equal((await cancel(token, aliceFirst.id, { reason: 'r' })).statusCode, 200)
  t.same(logs, [])
})

t.test('an access line: the request, its status, an error answer\'s code, the time taken and the patient\'s hash', async (t) => {
  const logs: string[] = []
  const { app, tokenFor, cancel } = await stack(t, { logs })
  const token = await tokenFor(alice.email)
  logs.length = 0
  t.equal((await cancel(token, bobFirst.id)).statusCode, 404)
  t.equal((await app.inject({ url: '/healthz' })).statusCode, 200)
  const [refused, health] = logs.map((line) => JSON.parse(line) as Record<string, unknown>).filter((line) => line.msg === 'request completed')
  t.match(refused, {
    req: { method: 'POST', url: `/appointments/${bobFirst.id}/cancel`, remoteAddress: '127.0.0.1' },
    res: { statusCode: 404 },
    code: 'APPOINTMENT_NOT_FOUND',
    responseTime: Number,
    patient: /^[0-9a-f]{32}$/
  })
  t.match(health, { req: { url: '/healthz' }, res: { statusCode: 200 }, responseTime: Number })
  t.equal(health?.code, undefined, 'no code for a success')
  t.equal(health?.patient, undefined, 'no patient without a session')
})

t.test('the audit record and the logs carry no email, reason, key or token', async (t) => {
  const logs: string[] = []
  const { tokenFor, cancel } = await stack(t, { logs })
  const token = await tokenFor(alice.email)
  await cancel(token, aliceFirst.id, { reason: 'private reason text' }, { 'idempotency-key': 'audit-key' })
  await cancel(token, bobFirst.id, { reason: 'private reason text' })
  // The app's retry with the same key: the first answer again, not a second cancellation.
  await cancel(token, aliceFirst.id, { reason: 'private reason text' }, { 'idempotency-key': 'audit-key' })
  const audits = logs.map((line) => JSON.parse(line)).filter((entry) => entry.audit !== undefined)
  t.equal(audits.length, 3)
  t.match(audits[0].audit, { event: 'appointment.cancel', appointmentId: aliceFirst.id, outcome: 'cancelled', status: 200, upstreamStatus: 200, earlier: null, patient: /^[0-9a-f]{32}$/ })
  t.match(audits[1].audit, { appointmentId: bobFirst.id, outcome: 'APPOINTMENT_NOT_FOUND', status: 404, upstreamStatus: null, earlier: null })
  t.match(audits[2].audit, { appointmentId: aliceFirst.id, outcome: 'cancelled', status: 200, upstreamStatus: null, earlier: 'replayed' })
  const all = logs.join('\n')
  for (const secret of [alice.email, 'private reason text', SANDBOX_KEY, token]) {
    t.notMatch(all, secret, 'no secret or personal value in the logs')
  }
})

t.test("a cancel the upstream refused has the upstream's status in its audit record", async (t) => {
  const logs: string[] = []
  const { sandbox, tokenFor, cancel } = await stack(t, { logs })
  const token = await tokenFor(alice.email)
  sandbox.control.setFailure({ kind: 'status', status: 400, endpoint: 'cancel', times: 1, body: { status: 400, success: false, message: 'Invalid request', error: 'appointment already started' } })
  t.equal((await cancel(token, aliceFirst.id)).statusCode, 400)
  const audits = logs.map((line) => JSON.parse(line)).filter((entry) => entry.audit !== undefined)
  t.equal(audits.length, 1)
  t.match(audits[0].audit, { appointmentId: aliceFirst.id, outcome: 'UPSTREAM_REJECTED', status: 400, upstreamStatus: 400 })
})

t.test('a cancel a per-client limit refused has RATE_LIMITED as its audit outcome', async (t) => {
  const logs: string[] = []
  const { tokenFor, cancel } = await stack(t, { env: { RATE_LIMIT_CANCEL: '1/1m' }, logs })
  const token = await tokenFor(alice.email)
  t.equal((await cancel(token, aliceFirst.id)).statusCode, 200)
  t.equal((await cancel(token, alice.appointments[1]!.id)).statusCode, 429)
  const audits = logs.map((line) => JSON.parse(line)).filter((entry) => entry.audit !== undefined)
  t.equal(audits.length, 2)
  t.match(audits[1].audit, { appointmentId: alice.appointments[1]!.id, outcome: 'RATE_LIMITED', status: 429, upstreamStatus: null })
})

t.test('the audit record names an appointment only by a well-formed id, in lower case: never the client\'s other text', async (t) => {
  const logs: string[] = []
  const { tokenFor, cancel } = await stack(t, { logs })
  const token = await tokenFor(alice.email)
  t.equal((await cancel(token, 'not-a-uuid')).statusCode, 400)
  t.equal((await cancel(token, aliceFirst.id.toUpperCase())).statusCode, 200)
  const audits = logs.map((line) => JSON.parse(line)).filter((entry) => entry.audit !== undefined)
  t.equal(audits.length, 2)
  t.match(audits[0].audit, { appointmentId: null, outcome: 'VALIDATION_FAILED', status: 400 })
  t.match(audits[1].audit, { appointmentId: aliceFirst.id.toLowerCase(), outcome: 'cancelled', status: 200 })
})

t.test('a keyed cancel answered with an error, and its replay, have the error\'s code as their audit outcome', async (t) => {
  const logs: string[] = []
  const { tokenFor, cancel } = await stack(t, { logs })
  const token = await tokenFor(alice.email)
  const keyed = { 'idempotency-key': 'not-yours-key' }
  t.equal((await cancel(token, bobFirst.id, undefined, keyed)).statusCode, 404)
  t.equal((await cancel(token, bobFirst.id, undefined, keyed)).statusCode, 404)
  const audits = logs.map((line) => JSON.parse(line)).filter((entry) => entry.audit !== undefined)
  t.equal(audits.length, 2)
  t.match(audits[0].audit, { appointmentId: bobFirst.id, outcome: 'APPOINTMENT_NOT_FOUND', status: 404 })
  t.match(audits[1].audit, { appointmentId: bobFirst.id, outcome: 'APPOINTMENT_NOT_FOUND', status: 404, earlier: 'replayed' })
})

t.test('with the ownership check, a cancel goes upstream with the id as the upstream lists it, whatever case it was asked in', async (t) => {
  const carol = { email: 'carol@example.com', name: 'Carol Patient', appointments: [{ ...aliceFirst, id: aliceFirst.id.toUpperCase(), agentEventId: 'EVT-Carol-1' }] }
  const { sandbox, tokenFor, cancel, cancelCalls } = await stack(t, { sandbox: { seed: [carol] } })
  const token = await tokenFor(carol.email)
  t.equal((await cancel(token, aliceFirst.id.toLowerCase())).statusCode, 200)
  t.same(cancelCalls().map((call) => (call.body as { appointmentId: string }).appointmentId), [aliceFirst.id.toUpperCase()])
  t.ok(sandbox.control.isCancelled(aliceFirst.id.toUpperCase()))
})

t.test('limits on the cancel path: per-session cancels, the org budget and the upstream cooldown', async (t) => {
  t.test('RATE_LIMIT_CANCEL counts cancels per session, before validation', async (t) => {
    const { tokenFor, cancel } = await stack(t, { env: { RATE_LIMIT_CANCEL: '2/1m' } })
    const token = await tokenFor(alice.email)
    t.equal((await cancel(token, 'not-a-uuid')).statusCode, 400)
    t.equal((await cancel(token, 'not-a-uuid')).statusCode, 400)
    const limited = await cancel(token, aliceFirst.id)
    t.equal(limited.statusCode, 429)
    t.match(limited.json(), { code: 'RATE_LIMITED' })
    t.ok(Number(limited.headers['retry-after']) >= 1)
    t.match(String(limited.headers['ratelimit-policy']), /"cancel";q=2;w=60/)
    t.equal((await cancel(await tokenFor(bob.email), bobFirst.id)).statusCode, 200, 'another patient is not affected')
  })

  t.test('the org budget covers the ownership list call and the cancel', async (t) => {
    const { sandbox, tokenFor, cancel } = await stack(t, { env: { CV_RATE_LIMIT: '2/60s' } })
    const token = await tokenFor(alice.email)
    t.equal((await cancel(token, aliceFirst.id)).statusCode, 200, 'list + cancel: two calls')
    const spent = await cancel(token, alice.appointments[1]!.id)
    t.equal(spent.statusCode, 429)
    t.match(spent.json(), { code: 'UPSTREAM_RATE_LIMITED' })
    t.ok(Number(spent.headers['retry-after']) >= 1)
    t.equal(sandbox.control.calls.length, 2, 'no third upstream call')
  })

  t.test('a cancel the budget refuses keeps the cached list: nothing happened to it', async (t) => {
    const { app, sandbox, tokenFor, cancel } = await stack(t, { env: { CV_RATE_LIMIT: '3/2s' } })
    const token = await tokenFor(alice.email)
    await app.inject({ url: '/appointments', headers: { authorization: `Bearer ${token}` } })
    t.equal((await cancel(token, alice.appointments[0]!.id)).statusCode, 200)
    t.equal((await cancel(token, alice.appointments[1]!.id)).statusCode, 200)
    t.equal((await cancel(token, alice.appointments[2]!.id)).statusCode, 429, 'the budget is spent')
    await new Promise((resolve) => setTimeout(resolve, 2100))
    t.equal((await cancel(token, alice.appointments[2]!.id)).statusCode, 200)
    t.same(sandbox.control.calls.map((call) => call.method), ['GET', 'POST', 'POST', 'POST'], 'no second list call')
  })

  t.test('a cancel the budget refuses is never sent, and its audit has no upstream status', async (t) => {
    const logs: string[] = []
    const { sandbox, tokenFor, cancel } = await stack(t, { env: { CV_RATE_LIMIT: '1/60s', OWNERSHIP_CHECK: 'off' }, logs })
    const token = await tokenFor(alice.email)
    t.equal((await cancel(token, aliceFirst.id)).statusCode, 200)
    const refused = await cancel(token, alice.appointments[1]!.id)
    t.equal(refused.statusCode, 429)
    t.match(refused.json(), { code: 'UPSTREAM_RATE_LIMITED' })
    t.equal(sandbox.control.calls.length, 1)
    const audits = logs.map((line) => JSON.parse(line)).filter((entry) => entry.audit !== undefined)
    t.match(audits[1]?.audit, { outcome: 'UPSTREAM_RATE_LIMITED', status: 429, upstreamStatus: null })
  })

  t.test("after the upstream's own 429, clients get 429 without an upstream call until the cooldown ends", async (t) => {
    const { sandbox, tokenFor, cancel } = await stack(t, { env: { OWNERSHIP_CHECK: 'off' } })
    const token = await tokenFor(alice.email)
    sandbox.control.setFailure({ kind: 'rate-limited', retryAfter: '30', endpoint: 'cancel', times: 1 })
    const first = await cancel(token, aliceFirst.id)
    t.equal(first.statusCode, 429)
    t.match(first.json(), { code: 'UPSTREAM_RATE_LIMITED' })
    const cooling = await cancel(token, alice.appointments[1]!.id)
    t.equal(cooling.statusCode, 429)
    t.ok(Number(cooling.headers['retry-after']) > 1)
    t.equal(sandbox.control.calls.length, 1, 'the cooldown stopped the second call')
  })
})

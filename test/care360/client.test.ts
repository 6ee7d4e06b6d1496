import { createServer, type AddressInfo, type Socket } from 'node:net'
import { createServer as createHttpServer, type RequestListener } from 'node:http'
import { once } from 'node:events'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import t, { type Test } from 'tap'
import { buildConnector } from 'undici'
import { ApiError, ErrorCode } from '../../src/errors.js'
import {
  createCare360Client,
  parseRetryAfter,
  UpstreamError,
  type Care360Client,
  type Care360ClientOptions,
  type UpstreamCallOutcome,
  type UpstreamEndpoint,
  type UpstreamGate
} from '../../src/care360/client.js'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'
import { upstreamRateLimited } from '../../src/limits/upstream-gate.js'
import { SANDBOX_KEY, startSandbox, type RunningSandbox } from '../helpers/sandbox.js'
import { freePort, listenOnLoopback } from '../helpers/ports.js'
import { failureOf } from './support.js'

const ALICE = DEMO_PATIENTS[0]!
const ALICE_FIRST = ALICE.appointments[0]!.id
const REASON = 'feeling much better now'
const CTX = { requestId: 'req-123' }

interface GateLog { gate: UpstreamGate, acquired: UpstreamEndpoint[], rateLimited: Array<number | null> }

function recordingGate (overrides: Partial<UpstreamGate> = {}): GateLog {
  const acquired: UpstreamEndpoint[] = []
  const rateLimited: Array<number | null> = []
  return {
    acquired,
    rateLimited,
    gate: {
      async acquire (endpoint) { acquired.push(endpoint) },
      async onRateLimited (ms) { rateLimited.push(ms) },
      ...overrides
    }
  }
}

/** A hand-written upstream on a loopback port, for answers the sandbox cannot give; its origin. */
async function stubUpstream (t: Test, handler: RequestListener, onConnection?: () => void): Promise<string> {
  const upstream = createHttpServer(handler)
  if (onConnection !== undefined) upstream.on('connection', onConnection)
  return `http://127.0.0.1:${await listenOnLoopback(t, upstream)}`
}

/** An upstream that answers every cancel at once, and counts the requests it received. */
async function countingUpstream (t: Test): Promise<{ baseUrl: string, requests: () => number }> {
  let received = 0
  const baseUrl = await stubUpstream(t, (request, response) => {
    received++
    request.resume()
    response.setHeader('content-type', 'application/json')
    response.end('{"status":200,"success":true,"message":"ok"}')
  })
  return { baseUrl, requests: () => received }
}

async function setup (t: Test, options: Partial<Care360ClientOptions> = {}): Promise<{ sandbox: RunningSandbox, client: Care360Client, log: GateLog }> {
  const sandbox = await startSandbox(t)
  const log = recordingGate()
  const client = createCare360Client({ baseUrl: sandbox.url, apiKey: SANDBOX_KEY, timeoutMs: 3000, gate: log.gate, ...options })
  t.teardown(() => client.close())
  return { sandbox, client, log }
}

function cancelAlice (client: Care360Client, withReason = true): Promise<unknown> {
  return client.cancelAppointment({ email: ALICE.email, appointmentId: ALICE_FIRST, ...(withReason ? { reason: REASON } : {}) }, CTX)
}

/** Nothing personal or secret in what a client or a log line could see. */
function assertClean (t: Test, error: UpstreamError): void {
  const visible = JSON.stringify({ message: error.message, detail: error.detail, headers: error.headers })
  for (const secret of [SANDBOX_KEY, ALICE.email, REASON]) t.notMatch(visible.toLowerCase(), secret.toLowerCase())
}

/** The sandbox runs in this process: on a loaded machine it may see a request after we gave up. */
async function waitFor (condition: () => boolean, ms = 2000): Promise<void> {
  const end = Date.now() + ms
  while (!condition() && Date.now() < end) await sleep(5)
}

/** What a call settled with, its answer or its error: for assertions that name what they check. */
async function settled (promise: Promise<unknown>): Promise<unknown> {
  return await promise.then((value) => value, (error: unknown) => error)
}

/**
 * Waits until at least `ms` have passed on the clock the client measures its deadline with. A
 * timer alone may fire a little early on that clock (the loop's time is cached, in whole ms).
 */
async function sleepAtLeast (ms: number): Promise<void> {
  const until = performance.now() + ms
  while (performance.now() < until) await sleep(Math.max(1, Math.ceil(until - performance.now())))
}

t.test('cancel 200: exactly the documented request reaches the upstream', async (t) => {
  const { sandbox, client, log } = await setup(t)
  const answer = await cancelAlice(client)
  t.same(answer, { status: 200, success: true, message: 'Meeting cancelled successfully' })
  t.same(log.acquired, ['cancel'])
  t.equal(sandbox.control.calls.length, 1)
  const call = sandbox.control.calls[0]!
  t.equal(call.method, 'POST')
  t.equal(call.path, '/api/v1/calendar/appointments/cancel')
  t.same(call.query, {})
  t.same(Object.keys(call.headers).sort(), ['connection', 'content-length', 'content-type', 'cv-api-key', 'host', 'x-request-id'])
  t.equal(call.headers['cv-api-key'], SANDBOX_KEY)
  t.equal(call.headers['content-type'], 'application/json')
  t.equal(call.headers['x-request-id'], 'req-123')
  t.strictSame(call.body, { email: ALICE.email, appointmentId: ALICE_FIRST, reason: REASON })
  t.ok(sandbox.control.isCancelled(ALICE_FIRST))
})

t.test('cancel without a reason sends no reason field', async (t) => {
  const { sandbox, client } = await setup(t)
  await cancelAlice(client, false)
  t.strictSame(sandbox.control.calls[0]!.body, { email: ALICE.email, appointmentId: ALICE_FIRST })
})

t.test('a reason is sent exactly as given, its blanks and line break included', async (t) => {
  // The contract's reason is the patient's text: trimming it is the upstream's business, not ours.
  const { sandbox, client } = await setup(t)
  const reason = '  Running late\n'
  await client.cancelAppointment({ email: ALICE.email, appointmentId: ALICE_FIRST, reason }, CTX)
  t.equal((sandbox.control.calls[0]!.body as { reason?: unknown }).reason, reason, 'the reason reached the upstream untouched')
})

t.test('cancel 200 envelope is coerced safely', async (t) => {
  const { sandbox, client } = await setup(t)
  sandbox.control.setFailure({ kind: 'status', status: 200, body: { status: 'x', success: true }, times: 1 })
  t.same(await cancelAlice(client), { status: 200, success: true, message: 'Appointment cancelled' })
  sandbox.control.setFailure({ kind: 'status', status: 200, body: { success: true, message: `done\u0000\u001b[31m for ${ALICE.email}` }, times: 1 })
  t.same(await cancelAlice(client), { status: 200, success: true, message: 'done[31m for [redacted]' })

  // Matched on status and success: a 200 that does not say success is not a cancel. Nor is it a
  // refusal: the upstream took the request, and whether the cancel happened is unknown.
  for (const body of [{ success: false, message: 'no' }, { status: 200, message: 'x' }, { success: 'false', status: 400, message: 'Invalid' }, { success: 'true' }]) {
    sandbox.control.setFailure({ kind: 'status', status: 200, body, times: 1 })
    t.match(await failureOf(cancelAlice(client)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: 'unknown', upstreamStatus: 200 }, JSON.stringify(body))
  }
  sandbox.control.setFailure({ kind: 'status', status: 200, body: [1, 2], times: 1 })
  t.match(await failureOf(cancelAlice(client)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: 'unknown', message: /whether the change was applied is unknown/ })
})

t.test('cancel answered 404 or 204 is unexpected', async (t) => {
  const { sandbox, client } = await setup(t)
  sandbox.control.setFailure({ kind: 'status', status: 404, endpoint: 'cancel', times: 1 })
  t.match(await failureOf(cancelAlice(client)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: 'answered', upstreamStatus: 404 })
  // A 2xx says the upstream took the cancel (it may have happened); a 3xx does not: it is an answer.
  sandbox.control.setFailure({ kind: 'status', status: 204, body: '', times: 1 })
  t.match(await failureOf(cancelAlice(client)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: 'unknown', upstreamStatus: 204 })
  for (const status of [300, 303]) {
    sandbox.control.setFailure({ kind: 'status', status, endpoint: 'cancel', times: 1 })
    const error = await failureOf(cancelAlice(client))
    t.match(error, { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: 'answered', upstreamStatus: status }, `${status}: not taken`)
    t.notMatch(error.message, /unknown/, `${status}: says nothing is unknown`)
  }
})

t.test('a list answered 202 or 204 is unexpected, and changed nothing', async (t) => {
  // Only a cancel's 2xx may have changed something; a list's says nothing of the kind.
  const { sandbox, client } = await setup(t)
  for (const status of [202, 204]) {
    sandbox.control.setFailure({ kind: 'status', status, endpoint: 'list', body: '', times: 1 })
    const error = await failureOf(client.fetchAppointments(ALICE.email, CTX))
    t.match(error, { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: 'answered', upstreamStatus: status }, `${status}`)
    t.notMatch(error.message, /unknown/, `${status}: says nothing is unknown`)
  }
})

t.test('upstream 400 passes message and error through', async (t) => {
  const { sandbox, client } = await setup(t)
  const error = await failureOf(client.cancelAppointment({ email: ALICE.email, appointmentId: DEMO_PATIENTS[1]!.appointments[0]!.id }, CTX))
  t.ok(error instanceof ApiError)
  t.match(error, {
    name: 'UpstreamError',
    statusCode: 400,
    code: ErrorCode.UPSTREAM_REJECTED,
    message: 'Invalid request',
    detail: 'Appointment does not belong to this invitee',
    outcome: 'answered',
    upstreamStatus: 400
  })
  t.ok(error.cause instanceof Error)
  t.same(error.toEnvelope(), { status: 400, success: false, message: 'Invalid request', code: 'UPSTREAM_REJECTED', error: 'Appointment does not belong to this invitee' })
  t.equal(sandbox.control.calls.length, 1)
})

t.test('upstream 400 texts are capped, stripped of controls and scrubbed', async (t) => {
  const { sandbox, client } = await setup(t)
  sandbox.control.setFailure({
    kind: 'status',
    status: 400,
    body: { message: `${'m'.repeat(1000)}`, error: `bad\u0007 \u202eemail ${ALICE.email.toUpperCase()} key ${SANDBOX_KEY} reason ${REASON}\r\n` },
    times: 1
  })
  const error = await failureOf(cancelAlice(client))
  t.equal(Array.from(error.message).length, 300)
  t.ok(error.message.endsWith('…'))
  t.equal(error.detail, 'bad email [redacted] key [redacted] reason [redacted]')
  assertClean(t, error)

  // The cap counts code points, not UTF-16 units: 300 emoji (600 units) stay whole, 301 do not.
  sandbox.control.setFailure({ kind: 'status', status: 400, body: { message: '\u{1F600}'.repeat(300) }, times: 1 })
  t.equal((await failureOf(cancelAlice(client))).message, '\u{1F600}'.repeat(300))
  sandbox.control.setFailure({ kind: 'status', status: 400, body: { message: '\u{1F600}'.repeat(301) }, times: 1 })
  t.equal((await failureOf(cancelAlice(client))).message, `${'\u{1F600}'.repeat(299)}…`)

  sandbox.control.setFailure({ kind: 'status', status: 400, body: { message: 42, error: '\u0001' }, times: 1 })
  const bare = await failureOf(cancelAlice(client))
  t.match(bare, { message: 'The appointment service rejected the request', detail: undefined })
})

t.test('a reason is redacted where it stands as whole words, never inside other words', async (t) => {
  const { sandbox, client } = await setup(t)
  async function messageFor (reason: string, message: string): Promise<unknown> {
    sandbox.control.setFailure({ kind: 'status', status: 200, body: { success: true, message }, times: 1 })
    const answer = await client.cancelAppointment({ email: ALICE.email, appointmentId: ALICE_FIRST, reason }, CTX) as { message: string }
    return answer.message
  }
  // [reason, upstream message, what the client gets, why]
  const cases: Array<[string, string, string, string]> = [
    // A short reason no longer eats the letters of the message (before: "C[redacted]ncelled...").
    ['a', 'Cancelled: a', 'Cancelled: [redacted]', 'a one-letter reason, standing alone'],
    ['A', 'Appointment cancelled for a patient', 'Appointment cancelled for [redacted] patient', 'in any case'],
    ['sick', 'Sickness noted; reason SICK.', 'Sickness noted; reason [redacted].', 'not inside a longer word'],
    // Letters and digits of any script count as word characters; punctuation does not.
    ['é', 'réunion é', 'réunion [redacted]', 'a letter of another script'],
    ['7', 'slot 17, reason 7', 'slot 17, reason [redacted]', 'a digit'],
    ['(flu)', 'reason(flu)noted', 'reason[redacted]noted', 'punctuation at both ends'],
    ['flu!', 'flu! flu!x', '[redacted] [redacted]x', 'punctuation at the end'],
    // Blanks around the reason are not matched; a reason of blanks alone redacts nothing.
    ['  flu  ', 'reason: flu, ok', 'reason: [redacted], ok', 'blanks around it'],
    ['   ', 'Appointment cancelled', 'Appointment cancelled', 'blanks alone'],
    // Controls the contract allows in a reason (tab, line feed), echoed, respaced, or gluing it to
    // the word before: matched as the text reads with its controls turned into blanks.
    ['feeling\tunwell\nagain', 'reason: feeling\tunwell\nagain.', 'reason: [redacted].', 'echoed with its controls'],
    ['my flu\ttest', 'Cancelled: my  flu test', 'Cancelled: [redacted]', 'respaced'],
    ['my flu test', 'Cancelled, reason\nmy flu test', 'Cancelled, reason [redacted]', 'after a line break'],
    // Regular-expression characters are matched as text.
    ['a.b*', 'axb a.b* ok', 'axb [redacted] ok', 'expression characters']
  ]
  for (const [reason, message, expected, why] of cases) t.equal(await messageFor(reason, message), expected, why)
})

t.test('the key and the email are redacted even inside longer tokens', async (t) => {
  const { sandbox, client } = await setup(t)
  sandbox.control.setFailure({ kind: 'status', status: 200, body: { success: true, message: `x${SANDBOX_KEY}y mail:${ALICE.email}z` }, times: 1 })
  t.same(await client.cancelAppointment({ email: ALICE.email, appointmentId: ALICE_FIRST, reason: 'other' }, CTX), {
    status: 200, success: true, message: 'x[redacted]y mail:[redacted]z'
  })
})

t.test('a reason of blanks redacts nothing of the upstream\'s message; one with blanks around it is redacted as echoed', async (t) => {
  let message = 'Cancelled: C++ course, see a%20b'
  const baseUrl = await stubUpstream(t, (request, response) => {
    request.resume()
    response.setHeader('content-type', 'application/json')
    response.end(JSON.stringify({ status: 200, success: true, message }))
  })
  const client = createCare360Client({ baseUrl, apiKey: SANDBOX_KEY, timeoutMs: 2000 })
  t.teardown(() => client.close())
  const cancel = async (reason: string): Promise<string> => (await client.cancelAppointment({ email: ALICE.email, appointmentId: ALICE_FIRST, reason }, CTX)).message
  for (const reason of [' ', '  ', '\t', 'flu ']) t.equal(await cancel(reason), message, `reason ${JSON.stringify(reason)}: nothing of it is in the message`)
  message = `reason=${encodeURIComponent('  knee hurts ')}`
  t.equal(await cancel('  knee hurts '), 'reason=[redacted]', 'blanks around it, percent-encoded with it')
})

t.test('the email, the reason and the key are redacted in the spellings an upstream echoes them in', async (t) => {
  // An upstream that quotes what it received quotes it as it received it: the list's query
  // percent-encoded (user_email=alice%40example.com), a form-style reason (+ for blanks), and a JSON
  // body echoed as text (a quote, a line feed or a backslash of the reason escaped). Each of these
  // reached the client's 400 (and 200) envelope, and a keyed cancel's Redis record, whole.
  const { sandbox, client } = await setup(t)
  const reason = 'Running "late"\nsorry'
  const sent = JSON.stringify({ email: ALICE.email, appointmentId: ALICE_FIRST, reason })
  const spellings = (value: string): string[] => [...new Set([value, encodeURIComponent(value), encodeURIComponent(value).replace(/%20/g, '+'), JSON.stringify(value).slice(1, -1)])]
  function assertNoSpelling (visible: string, why: string): void {
    const text = visible.toLowerCase()
    for (const [what, value] of [['email', ALICE.email], ['reason', reason], ['key', SANDBOX_KEY]] as const) {
      const found = spellings(value).filter((spelling) => text.includes(spelling.toLowerCase()))
      t.same(found, [], `${why}: no ${what} in any spelling`)
    }
  }
  const cancel = (): Promise<unknown> => client.cancelAppointment({ email: ALICE.email, appointmentId: ALICE_FIRST, reason }, CTX)
  const echoes: Array<[string, Record<string, unknown>]> = [
    ['the request body echoed as JSON text', { message: 'Invalid request', error: `invalid body: ${sent}` }],
    ['percent-encoded', { message: `reason=${encodeURIComponent(reason)}`, error: `user_email=${encodeURIComponent(ALICE.email)}` }],
    ['form-encoded', { message: `reason=${encodeURIComponent(reason).replace(/%20/g, '+')}`, error: 'Invalid request' }]
  ]
  for (const [why, body] of echoes) {
    sandbox.control.setFailure({ kind: 'status', status: 400, endpoint: 'cancel', body: { status: 400, success: false, ...body }, times: 1 })
    const error = await failureOf(cancel())
    assertNoSpelling(`${error.message}\n${error.detail ?? ''}`, `a cancel's 400, ${why}`)
  }
  sandbox.control.setFailure({ kind: 'status', status: 200, endpoint: 'cancel', body: { status: 200, success: true, message: `Cancelled: ${sent}` }, times: 1 })
  assertNoSpelling((await cancel() as { message: string }).message, 'a cancel\'s 200 message echoing the body')
  // The list's query carries the email percent-encoded: an upstream that quotes its request line.
  sandbox.control.setFailure({ kind: 'status', status: 400, endpoint: 'list', body: { status: 400, success: false, message: `Invalid query user_email=${encodeURIComponent(ALICE.email)}` }, times: 1 })
  assertNoSpelling((await failureOf(client.fetchAppointments(ALICE.email, CTX))).message, 'the list\'s 400 quoting its query')
})

t.test('upstream 400 that is not the JSON envelope is an upstream error', async (t) => {
  const { sandbox, client } = await setup(t)
  sandbox.control.setFailure({ kind: 'status', status: 400, body: '<html>Bad Request</html>', headers: { 'content-type': 'text/html' }, times: 1 })
  t.match(await failureOf(cancelAlice(client)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: 'answered', upstreamStatus: 400 })
})

t.test('upstream 400 whose JSON body is an array, not the envelope, is an upstream error', async (t) => {
  // An array is JSON but no envelope: no message or error to pass through as the upstream's refusal.
  const { sandbox, client } = await setup(t)
  sandbox.control.setFailure({ kind: 'status', status: 400, body: [], times: 1 })
  t.match(await failureOf(cancelAlice(client)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: 'answered', upstreamStatus: 400 }, 'a 400 of [] is a 502, not UPSTREAM_REJECTED')
})

t.test('upstream 401 is our key, answered 502 without blaming the patient', async (t) => {
  const sandbox = await startSandbox(t)
  const client = createCare360Client({ baseUrl: sandbox.url, apiKey: 'wrong-key', timeoutMs: 3000 })
  t.teardown(() => client.close())
  const error = await failureOf(cancelAlice(client))
  t.match(error, { statusCode: 502, code: ErrorCode.UPSTREAM_AUTH_FAILED, outcome: 'answered', upstreamStatus: 401 })
  t.notMatch(error.message, /you|your|session|patient/i)
  t.notMatch(error.message, 'wrong-key')
  assertClean(t, error)
  t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)), { code: ErrorCode.UPSTREAM_AUTH_FAILED })
  t.notOk(sandbox.control.isCancelled(ALICE_FIRST))
})

t.test('upstream 429', async (t) => {
  t.test('Retry-After in seconds', async (t) => {
    const { sandbox, client, log } = await setup(t)
    sandbox.control.setFailure({ kind: 'rate-limited', retryAfter: '7', times: 1 })
    const error = await failureOf(cancelAlice(client))
    t.match(error, { statusCode: 429, code: ErrorCode.UPSTREAM_RATE_LIMITED, outcome: 'answered', upstreamStatus: 429 })
    t.same(error.headers, { 'Retry-After': '7' })
    t.same(log.rateLimited, [7000])
    assertClean(t, error)
  })

  t.test('a 429 whose body is too large, streams past the cap or stalls is still a 429, with its cooldown', async (t) => {
    let mode = 'declared'
    const baseUrl = await stubUpstream(t, (request, response) => {
      request.resume()
      response.writeHead(429, { 'retry-after': '30', 'content-type': 'application/json', ...(mode === 'declared' ? { 'content-length': String(2 * 1024 * 1024) } : {}) })
      if (mode === 'declared') response.write('{"status":429,')
      else if (mode === 'streamed') response.end(`{"pad":"${'x'.repeat(100 * 1024)}"}`)
      else response.write('{"status":429,') // then nothing: stalled
    })
    const log = recordingGate()
    const client = createCare360Client({ baseUrl, apiKey: SANDBOX_KEY, timeoutMs: 5000, gate: log.gate })
    t.teardown(() => client.close())
    for (const each of ['declared', 'streamed', 'stalled']) {
      mode = each
      const started = performance.now()
      const error = await failureOf(cancelAlice(client))
      t.match(error, { statusCode: 429, code: ErrorCode.UPSTREAM_RATE_LIMITED, upstreamStatus: 429 }, each)
      t.same(error.headers, { 'Retry-After': '30' }, each)
      // Decided by its headers: never held to the deadline by its body.
      t.ok(performance.now() - started < 2500, `${each}: answered from its headers`)
    }
    t.same(log.rateLimited, [30_000, 30_000, 30_000], 'the gate heard each, with its Retry-After')
  })

  t.test('Retry-After as an HTTP-date', async (t) => {
    const { sandbox, client, log } = await setup(t)
    sandbox.control.setFailure({ kind: 'rate-limited', retryAfter: new Date(Date.now() + 30_000).toUTCString(), times: 1 })
    const error = await failureOf(client.fetchAppointments(ALICE.email, CTX))
    t.match(error, { statusCode: 429, code: ErrorCode.UPSTREAM_RATE_LIMITED })
    const ms = log.rateLimited[0]!
    t.ok(ms > 28_000 && ms <= 30_000, `cooldown ${ms}`)
    t.match(error.headers['Retry-After'], /^(29|30)$/)
  })

  t.test('a Retry-After date is read against the answer\'s Date, the upstream\'s clock', async (t) => {
    const { sandbox, client, log } = await setup(t)
    // The upstream's clock an hour behind ours: "30 s after my now".
    const theirs = Date.now() - 3_600_000
    sandbox.control.setFailure({ kind: 'status', status: 429, headers: { date: new Date(theirs).toUTCString(), 'retry-after': new Date(theirs + 30_000).toUTCString() }, times: 1 })
    const error = await failureOf(cancelAlice(client))
    t.match(error, { statusCode: 429, code: ErrorCode.UPSTREAM_RATE_LIMITED })
    t.ok(Math.abs((log.rateLimited[0] ?? 0) - 30_000) <= 1000, `a 30 s cooldown, not none (${log.rateLimited[0]})`)
    sandbox.control.setFailure({ kind: 'status', status: 429, headers: { date: 'not a date', 'retry-after': new Date(Date.now() + 20_000).toUTCString() }, times: 1 })
    await failureOf(cancelAlice(client))
    t.ok((log.rateLimited[1] ?? 0) > 18_000 && (log.rateLimited[1] ?? 0) <= 20_000, `without a usable Date, ours (${log.rateLimited[1]})`)
  })

  t.test('no Retry-After: null to the gate, at least one second to the client', async (t) => {
    const { sandbox, client, log } = await setup(t)
    sandbox.control.setFailure({ kind: 'rate-limited', retryAfter: null, times: 1 })
    const error = await failureOf(cancelAlice(client))
    t.same(log.rateLimited, [null])
    t.same(error.headers, { 'Retry-After': '1' })
  })

  t.test('the gate may decide the cooldown, or fail without changing the answer', async (t) => {
    const sandbox = await startSandbox(t)
    sandbox.control.setFailure({ kind: 'rate-limited', retryAfter: 'soon' })
    const deciding = createCare360Client({
      baseUrl: sandbox.url,
      apiKey: SANDBOX_KEY,
      timeoutMs: 3000,
      gate: { async acquire () {}, async onRateLimited () { return 12_500 } }
    })
    t.teardown(() => deciding.close())
    t.same((await failureOf(cancelAlice(deciding))).headers, { 'Retry-After': '13' })
    const broken = createCare360Client({
      baseUrl: sandbox.url,
      apiKey: SANDBOX_KEY,
      timeoutMs: 3000,
      gate: { async acquire () {}, async onRateLimited () { throw new Error('redis down') } }
    })
    t.teardown(() => broken.close())
    t.match(await failureOf(cancelAlice(broken)), { statusCode: 429, code: ErrorCode.UPSTREAM_RATE_LIMITED, headers: { 'Retry-After': '1' } })
  })

  t.test('the sandbox quota itself', async (t) => {
    const sandbox = await startSandbox(t, { quota: { count: 1, windowMs: 60_000 } })
    const log = recordingGate()
    const client = createCare360Client({ baseUrl: sandbox.url, apiKey: SANDBOX_KEY, timeoutMs: 3000, gate: log.gate })
    t.teardown(() => client.close())
    await client.fetchAppointments(ALICE.email, CTX)
    const error = await failureOf(client.fetchAppointments(ALICE.email, CTX))
    t.match(error, { statusCode: 429, headers: { 'Retry-After': /^(59|60)$/ } })
    t.equal(log.rateLimited.length, 1)
    t.equal(log.rateLimited[0], Number(error.headers['Retry-After']) * 1000)
  })
})

t.test('parseRetryAfter', async (t) => {
  const now = Date.parse('2030-01-01T00:00:00Z')
  t.equal(parseRetryAfter('120', now), 120_000)
  t.equal(parseRetryAfter(['3', '9'], now), 3000)
  t.equal(parseRetryAfter('99999999999', now), 600_000, 'clamped to 10 minutes')
  t.equal(parseRetryAfter('Tue, 01 Jan 2030 00:00:42 GMT', now), 42_000)
  t.equal(parseRetryAfter('Mon, 31 Dec 2029 23:00:00 GMT', now), 0, 'a past date means now')
  t.equal(parseRetryAfter('Tuesday, 01-Jan-30 00:00:42 GMT', now), 42_000, 'RFC 850')
  // asctime carries no zone: GMT, whatever the process's time zone (Date.parse would read it as local).
  t.equal(parseRetryAfter('Tue Jan  1 00:01:00 2030', now), 60_000, 'asctime')
  t.equal(parseRetryAfter('Tue Jan 01 00:01:00 2030', now), 60_000, 'asctime with a zero')
  for (const bad of [undefined, '', '  ', '-5', '1.5', 'soon', '2030-01-01']) t.equal(parseRetryAfter(bad, now), null, String(bad))
  t.type(parseRetryAfter('0'), 'number')
})

t.test('parseRetryAfter reads asctime as GMT in a process that is not on UTC', async (t) => {
  // The suite runs on UTC, where reading asctime as local time goes unnoticed.
  const zone = process.env.TZ
  t.teardown(() => {
    if (zone === undefined) delete process.env.TZ
    else process.env.TZ = zone
  })
  process.env.TZ = 'America/New_York'
  const now = Date.parse('2030-01-01T00:00:00Z')
  t.equal(new Date(now).getTimezoneOffset(), 300, 'the process is on New York time')
  t.equal(parseRetryAfter('Tue Jan  1 00:01:00 2030', now), 60_000, 'asctime one minute after now, read as GMT')
})

t.test('upstream 5xx and unexpected statuses are upstream errors', async (t) => {
  const { sandbox, client } = await setup(t)
  for (const status of [500, 503, 418, 302, 201]) {
    sandbox.control.setFailure({ kind: 'status', status, headers: status === 302 ? { location: '/elsewhere' } : {}, times: 1 })
    const error = await failureOf(cancelAlice(client))
    // A 2xx took the cancel: it may have happened (unknown); any other status is an answer.
    t.match(error, { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: status === 201 ? 'unknown' : 'answered', upstreamStatus: status }, String(status))
    t.ok(error.cause instanceof Error)
  }
  t.equal(sandbox.control.calls.length, 5, 'no redirect followed, nothing retried')
  t.notOk(sandbox.control.isCancelled(ALICE_FIRST))
})

t.test('a body that is not JSON is an upstream error', async (t) => {
  const { sandbox, client } = await setup(t)
  sandbox.control.setFailure({ kind: 'garbage' })
  t.match(await failureOf(cancelAlice(client)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: 'unknown', upstreamStatus: 200 }, 'a cancel\'s 200 that cannot be read may have cancelled')
  t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR })
})

t.test('a body over the cap is refused, and the pool keeps working', async (t) => {
  const { sandbox, client } = await setup(t, { maxBodyBytes: 1024, maxListBodyBytes: 1024 })
  sandbox.control.setFailure({ kind: 'huge', times: 1 })
  t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: 'answered', upstreamStatus: 200 })
  // Declared up front this time (content-length), refused before reading.
  sandbox.control.setFailure({ kind: 'status', status: 400, body: { message: 'x'.repeat(4096) }, times: 1 })
  t.match(await failureOf(cancelAlice(client)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, upstreamStatus: 400 })
  // Small enough to answer within the cap.
  t.same((await client.fetchAppointments(DEMO_PATIENTS[2]!.email, CTX)), [])
})

t.test('a declared content-length of exactly the cap is read, one byte more is refused', async (t) => {
  const max = 256
  const { sandbox, client } = await setup(t, { maxBodyBytes: max })
  /** A cancel's 200 envelope serialized to exactly `size` bytes (the sandbox declares its length). */
  function bodyOf (size: number): { status: number, success: boolean, message: string } {
    const empty = { status: 200, success: true, message: '' }
    return { ...empty, message: 'x'.repeat(size - JSON.stringify(empty).length) }
  }
  t.equal(JSON.stringify(bodyOf(max)).length, max)
  sandbox.control.setFailure({ kind: 'status', status: 200, body: bodyOf(max), endpoint: 'cancel', times: 1 })
  t.match(await settled(cancelAlice(client)), { status: 200, success: true, message: /^x+$/ }, 'exactly the cap, declared, is read')
  sandbox.control.setFailure({ kind: 'status', status: 200, body: bodyOf(max + 1), endpoint: 'cancel', times: 1 })
  t.match(await failureOf(cancelAlice(client)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: 'unknown', upstreamStatus: 200 }, 'one byte over the cap is refused (a 200: the cancel may have happened)')
})

t.test('an informational answer (1xx) is not the answer: its headers are never read as the final one\'s', async (t) => {
  // A 103 Early Hints (or a 102) may come before the final answer; a Content-Length on it (which
  // RFC 9110 8.6 forbids; a misbehaving server may send it) is no body of the answer to come. undici hands
  // the 1xx to the handler as a response start of its own.
  let requests = 0
  const sockets = new Set<Socket>()
  const upstream = createServer(function onConnection (socket) {
    sockets.add(socket)
    socket.on('data', () => {
      requests++
      const body = '{"status":200,"success":true,"message":"Meeting cancelled successfully"}'
      socket.write('HTTP/1.1 103 Early Hints\r\nlink: </x>; rel=preload\r\ncontent-length: 1000000\r\n\r\n')
      socket.write(`HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n${body}`)
    })
  })
  upstream.listen(0, '127.0.0.1')
  await once(upstream, 'listening')
  t.teardown(() => {
    for (const socket of sockets) socket.destroy()
    upstream.close()
  })
  const client = createCare360Client({ baseUrl: `http://127.0.0.1:${(upstream.address() as AddressInfo).port}`, apiKey: SANDBOX_KEY, timeoutMs: 3000, maxBodyBytes: 1000 })
  t.teardown(() => client.close())
  t.same(await settled(cancelAlice(client)), { status: 200, success: true, message: 'Meeting cancelled successfully' }, 'the final answer is read')
  t.equal(requests, 1)
})

t.test('the default caps: 64 KiB for a cancel\'s answer, 1 MiB for a list (not paginated: a patient\'s whole list)', async (t) => {
  const { sandbox, client } = await setup(t)
  sandbox.control.setFailure({ kind: 'huge', times: 1 })
  t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)), { code: ErrorCode.UPSTREAM_ERROR })
  sandbox.control.setFailure({ kind: 'status', status: 200, body: { success: true, data: [], pad: 'x'.repeat(60_000) }, times: 1 })
  t.same(await client.fetchAppointments(ALICE.email, CTX), [])
  // A patient with six hundred appointments of 1.5 KB each: about 900 KB, all listed.
  const many = Array.from({ length: 600 }, (_, i) => ({ id: `00000000-0000-4000-8000-${String(i).padStart(12, '0')}`, title: 'x'.repeat(1400), start: '2030-01-01T10:00:00.000Z' }))
  sandbox.control.setFailure({ kind: 'status', status: 200, body: { status: 200, success: true, message: 'ok', data: many }, times: 1 })
  t.equal((await client.fetchAppointments(ALICE.email, CTX)).length, 600)
  // A cancel's answer of 100 KB is not one.
  sandbox.control.setFailure({ kind: 'status', status: 200, endpoint: 'cancel', body: { status: 200, success: true, message: 'x'.repeat(100_000) }, times: 1 })
  t.match(await failureOf(cancelAlice(client)), { code: ErrorCode.UPSTREAM_ERROR, upstreamStatus: 200 })
})

t.test('a streamed body without content-length is capped at exactly its cap', async (t) => {
  // A plain upstream that streams (chunked, no content-length) a JSON list of exactly `size`
  // bytes: only the running count can refuse it, not the declared length.
  const max = 1024
  let size = 0
  const declared: Array<string | undefined> = []
  const baseUrl = await stubUpstream(t, function answer (_request, response) {
    const head = '{"status":200,"success":true,"data":[],"pad":"'
    const tail = '"}'
    const body = `${head}${'x'.repeat(size - head.length - tail.length)}${tail}`
    response.writeHead(200, { 'content-type': 'application/json' })
    for (let at = 0; at < body.length; at += 100) response.write(body.slice(at, at + 100))
    declared.push(response.getHeader('content-length') as string | undefined)
    response.end()
  })
  const client = createCare360Client({ baseUrl, apiKey: SANDBOX_KEY, timeoutMs: 3000, maxListBodyBytes: max })
  t.teardown(() => client.close())
  for (const over of [max + 1, 2 * max]) {
    size = over
    t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)),
      { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: 'answered', upstreamStatus: 200 }, `${over} bytes`)
  }
  size = max
  t.same(await client.fetchAppointments(ALICE.email, CTX), [], 'exactly the cap is read')
  t.same(declared, [undefined, undefined, undefined], 'no content-length was declared')
})

t.test('connection refused: never sent, upstream unavailable', async (t) => {
  const port = await freePort()
  const log = recordingGate()
  const client = createCare360Client({ baseUrl: `http://127.0.0.1:${port}`, apiKey: SANDBOX_KEY, timeoutMs: 3000, gate: log.gate })
  t.teardown(() => client.close())
  const error = await failureOf(cancelAlice(client))
  t.match(error, { statusCode: 502, code: ErrorCode.UPSTREAM_UNAVAILABLE, outcome: 'not-sent', upstreamStatus: null })
  t.match(error.cause, { code: 'ECONNREFUSED' })
  assertClean(t, error)
  t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)), { code: ErrorCode.UPSTREAM_UNAVAILABLE, outcome: 'not-sent' })
  t.same(log.acquired, ['cancel', 'list'])
})

t.test('a closed client sends nothing', async (t) => {
  const { sandbox, client } = await setup(t)
  await client.close()
  t.match(await failureOf(cancelAlice(client)), { code: ErrorCode.UPSTREAM_UNAVAILABLE, outcome: 'not-sent' })
  t.equal(sandbox.control.calls.length, 0)
})

t.test('socket reset before the cancel is applied: outcome unknown, not retried', async (t) => {
  const { sandbox, client, log } = await setup(t)
  sandbox.control.setFailure({ kind: 'reset', times: 1 })
  const error = await failureOf(cancelAlice(client))
  t.match(error, { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: 'unknown', upstreamStatus: null })
  t.match(error.message, /unknown/)
  assertClean(t, error)
  t.equal(sandbox.control.calls.length, 1, 'the POST is never retried')
  t.same(log.acquired, ['cancel'])
  t.notOk(sandbox.control.isCancelled(ALICE_FIRST))
})

t.test('socket reset after the cancel is applied: outcome unknown, and it did happen', async (t) => {
  const { sandbox, client } = await setup(t)
  sandbox.control.setFailure({ kind: 'reset-after-apply', endpoint: 'cancel', times: 1 })
  t.match(await failureOf(cancelAlice(client)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: 'unknown' })
  t.equal(sandbox.control.calls.length, 1)
  t.ok(sandbox.control.isCancelled(ALICE_FIRST))
})

t.test('a GET that loses its connection is sent once more, and only once', async (t) => {
  const { sandbox, client, log } = await setup(t)
  sandbox.control.setFailure({ kind: 'reset', endpoint: 'list', times: 1 })
  const listed = await client.fetchAppointments(ALICE.email, CTX)
  t.ok(listed.length > 0, 'the second sending is answered')
  t.equal(sandbox.control.calls.length, 2)
  t.same(log.acquired, ['list', 'list'], 'each sending passed the gate')

  sandbox.control.setFailure({ kind: 'reset', endpoint: 'list', times: 2 })
  const error = await failureOf(client.fetchAppointments(ALICE.email, CTX))
  t.match(error, { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: 'unknown', upstreamStatus: null })
  t.notMatch(error.message, /unknown/, 'a read changes nothing')
  t.equal(sandbox.control.calls.length, 4, 'lost twice: sent twice, then the 502')

  // A gate that refuses the second sending: its refusal is the answer, and the slot comes back.
  let admitted = 0
  let refuseSecond = true
  const gated = createCare360Client({
    baseUrl: sandbox.url,
    apiKey: SANDBOX_KEY,
    timeoutMs: 3000,
    connections: 1,
    gate: {
      acquire () {
        admitted++
        if (refuseSecond && admitted === 2) throw upstreamRateLimited(1000)
      },
      async onRateLimited () { return 1000 }
    }
  })
  t.teardown(() => gated.close())
  sandbox.control.setFailure({ kind: 'reset', endpoint: 'list', times: 1 })
  const refusal = await gated.fetchAppointments(ALICE.email, CTX).catch((error: unknown) => error)
  t.match(refusal, { statusCode: 429, code: ErrorCode.UPSTREAM_RATE_LIMITED }, 'the gate\'s refusal of the second sending')
  refuseSecond = false
  t.same(await gated.fetchAppointments(ALICE.email, CTX), listed, 'the one connection\'s slot was given back')
})

t.test('a GET whose connection is lost after its answer began, or past its deadline, is not sent again', async (t) => {
  // The status came, then the connection went mid-body: the upstream answered; its status stays on the record.
  let calls = 0
  const baseUrl = await stubUpstream(t, (request, response) => {
    calls++
    request.resume()
    response.writeHead(200, { 'content-type': 'application/json', 'content-length': '100' })
    response.write('{"status":200,')
    setTimeout(() => { response.socket?.destroy() }, 20)
  })
  const client = createCare360Client({ baseUrl, apiKey: SANDBOX_KEY, timeoutMs: 3000 })
  t.teardown(() => client.close())
  t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: 'unknown', upstreamStatus: 200 })
  t.equal(calls, 1)
})

/**
 * An upstream that answers the first request on each connection and closes the connection,
 * unanswered, when the next one arrives on it: the classic keep-alive race, its idle timer (or its
 * restart) closing a connection just as our request on it is in transit. What it received, in order.
 */
async function closingKeptAliveUpstream (t: Test): Promise<{ baseUrl: string, received: string[], connections: () => number }> {
  let connections = 0
  const served = new WeakSet<Socket>()
  const received: string[] = []
  const baseUrl = await stubUpstream(t, (request, response) => {
    received.push(request.method as string)
    request.resume()
    if (served.has(request.socket)) {
      request.socket.destroy()
      return
    }
    served.add(request.socket)
    response.setHeader('content-type', 'application/json')
    response.end(request.method === 'GET' ? '{"status":200,"success":true,"message":"ok","data":[]}' : '{"status":200,"success":true,"message":"ok"}')
  }, () => { connections++ })
  return { baseUrl, received, connections: () => connections }
}

t.test('a list sent on a kept-alive connection the upstream closes as it arrives is sent again, once, on a new one', async (t) => {
  // undici checks an idle socket before reusing it, but a FIN still on the wire is not seen, and
  // its core never retries. Nothing came back: a GET is safe to send again on a fresh connection,
  // and the patient should not get a 502 (nor a cancel fail its ownership check) for the age of a
  // connection.
  const { baseUrl, received, connections } = await closingKeptAliveUpstream(t)
  const log = recordingGate()
  const client = createCare360Client({ baseUrl, apiKey: SANDBOX_KEY, timeoutMs: 3000, connections: 1, gate: log.gate })
  t.teardown(() => client.close())
  t.same(await client.fetchAppointments(ALICE.email, CTX), [], 'the first list opens the connection')
  t.same(await settled(client.fetchAppointments(ALICE.email, CTX)), [], 'the list that met the close is answered, not a 502')
  t.same(received, ['GET', 'GET', 'GET'], 'sent again once')
  t.equal(connections(), 2, 'on a new connection')
  t.same(log.acquired, ['list', 'list', 'list'], 'the second sending is an upstream call: it draws from the org budget')
})

t.test('a connection carries requestsPerConnection requests, the last saying Connection: close, then a new one is made', async (t) => {
  let connections = 0
  const closing: Array<string | undefined> = []
  const baseUrl = await stubUpstream(t, (request, response) => {
    closing.push(request.headers.connection)
    request.resume()
    response.setHeader('content-type', 'application/json')
    response.end('{"status":200,"success":true,"message":"ok","data":[]}')
  }, () => { connections++ })
  const client = createCare360Client({ baseUrl, apiKey: SANDBOX_KEY, timeoutMs: 3000, connections: 1, requestsPerConnection: 3 })
  t.teardown(() => client.close())
  for (let i = 0; i < 7; i++) t.same(await client.fetchAppointments(ALICE.email, CTX), [])
  t.equal(connections, 3, 'seven calls, three connections')
  t.same(closing.map((header) => header === 'close'), [false, false, true, false, false, true, false], 'the third on each says so')
})

t.test('a cancel sent on a kept-alive connection the upstream closes as it arrives is never sent again', async (t) => {
  const { baseUrl, received } = await closingKeptAliveUpstream(t)
  const client = createCare360Client({ baseUrl, apiKey: SANDBOX_KEY, timeoutMs: 3000, connections: 1 })
  t.teardown(() => client.close())
  t.same(await client.fetchAppointments(ALICE.email, CTX), [], 'a list opens the connection')
  const error = await failureOf(cancelAlice(client))
  t.match(error, { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: 'unknown' }, 'the upstream may have read it: an unknown outcome')
  t.same(received, ['GET', 'POST'], 'sent once')
})

t.test('slower than the deadline: 504', async (t) => {
  const { sandbox, client } = await setup(t, { timeoutMs: 150 })
  sandbox.control.setFailure({ kind: 'slow', delayMs: 600, times: 1 })
  const started = Date.now()
  const error = await failureOf(cancelAlice(client))
  const elapsed = Date.now() - started
  t.match(error, { statusCode: 504, code: ErrorCode.UPSTREAM_TIMEOUT, outcome: 'unknown', upstreamStatus: null })
  t.ok(elapsed >= 140, `answered after ${elapsed} ms, not before the deadline`)
  assertClean(t, error)
  await waitFor(() => sandbox.control.calls.length === 1)

  sandbox.control.setFailure({ kind: 'slow-after-apply', delayMs: 600, times: 1 })
  t.match(await failureOf(cancelAlice(client)), { statusCode: 504, outcome: 'unknown' })
  await waitFor(() => sandbox.control.isCancelled(ALICE_FIRST))
  t.ok(sandbox.control.isCancelled(ALICE_FIRST), 'applied although the answer came too late')

  sandbox.control.setFailure({ kind: 'slow', delayMs: 600, times: 1 })
  t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)), { statusCode: 504, code: ErrorCode.UPSTREAM_TIMEOUT })
})

t.test('an answer slower than half the deadline but within it is read', async (t) => {
  const { sandbox, client } = await setup(t, { timeoutMs: 3000 })
  sandbox.control.setFailure({ kind: 'slow', delayMs: 1500, times: 2 })
  const started = Date.now()
  const [cancelled, listed] = await Promise.all([cancelAlice(client), client.fetchAppointments(DEMO_PATIENTS[1]!.email, CTX)])
  t.same(cancelled, { status: 200, success: true, message: 'Meeting cancelled successfully' })
  t.equal((listed as unknown[]).length, DEMO_PATIENTS[1]!.appointments.length)
  t.ok(Date.now() - started >= 1400, 'both waited for the slow upstream')
  t.equal(sandbox.control.calls.length, 2)
})

t.test('a request still waiting for a socket at the deadline is never sent', async (t) => {
  const { sandbox, client } = await setup(t, { timeoutMs: 100, connections: 1 })
  sandbox.control.setFailure({ kind: 'slow', delayMs: 250 })
  const bob = DEMO_PATIENTS[1]!
  const both = Promise.all([
    failureOf(cancelAlice(client)),
    failureOf(client.cancelAppointment({ email: bob.email, appointmentId: bob.appointments[0]!.id }, CTX))
  ])
  while (sandbox.control.calls.length === 0) await sleep(5)
  // Block the event loop past both deadlines, so that both expire in one timers phase, before the
  // freed socket could take the queued cancel: the order a loaded process would see.
  const until = Date.now() + 150
  while (Date.now() < until) { /* busy on purpose */ }
  const [first, second] = await both
  t.match(first, { statusCode: 504, outcome: 'unknown' })
  t.match(second, { statusCode: 504, code: ErrorCode.UPSTREAM_TIMEOUT, outcome: 'not-sent' })
  await sleep(300)
  t.equal(sandbox.control.calls.length, 1, 'the queued cancel never reached the upstream')
  t.notOk(sandbox.control.isCancelled(bob.appointments[0]!.id))
})

t.test('a call that gets no connection by its deadline is never sent, and the metrics hear it', async (t) => {
  const { baseUrl, requests } = await countingUpstream(t)
  // The first call holds the only connection's slot through a slow gate (a Redis round trip
  // that takes its time): the second waits for the slot past its deadline.
  let first = true
  const gate: UpstreamGate = {
    acquire: async () => {
      if (!first) return
      first = false
      await sleep(300)
    },
    onRateLimited: async () => {}
  }
  const observed: string[] = []
  const client = createCare360Client({ baseUrl, apiKey: SANDBOX_KEY, timeoutMs: 100, connections: 1, gate, observe: (_endpoint, outcome) => { observed.push(outcome) } })
  t.teardown(() => client.close())
  const holder = failureOf(cancelAlice(client))
  const waiter = await failureOf(cancelAlice(client))
  t.match(waiter, { statusCode: 504, code: ErrorCode.UPSTREAM_TIMEOUT, outcome: 'not-sent' })
  t.same(observed, ['timeout'], 'heard as a timeout')
  t.match(await holder, { statusCode: 504, outcome: 'not-sent' }, 'the holder, past its own deadline after the gate, is not sent either')
  t.equal(requests(), 0)
})

/**
 * A gate that refuses the first `refusals` calls (the org budget spent), then lets calls by: by
 * throwing, as the memory gate does, or by rejecting, as the Redis one does.
 */
function refusingGate (refusals: number, how: 'throws' | 'rejects'): UpstreamGate {
  let left = refusals
  function refuse (): void {
    if (left === 0) return
    left--
    throw new ApiError(429, ErrorCode.UPSTREAM_RATE_LIMITED, 'budget spent')
  }
  return {
    acquire: how === 'throws' ? refuse : async () => { refuse() },
    onRateLimited: async () => {}
  }
}

t.test('a gate\'s refusal gives the connection back: more refusals than connections, and the next call still goes at once', async (t) => {
  for (const how of ['throws', 'rejects'] as const) {
    t.test(`a gate that ${how}`, async (t) => {
      const timeoutMs = 1000
      const { sandbox, client } = await setup(t, { timeoutMs, connections: 1, gate: refusingGate(3, how) })
      for (let i = 1; i <= 3; i++) {
        t.match(await settled(cancelAlice(client)), { statusCode: 429, code: ErrorCode.UPSTREAM_RATE_LIMITED }, `refusal ${i} is the gate's 429, not a wait for a connection`)
      }
      const started = performance.now()
      t.same(await settled(cancelAlice(client)), { status: 200, success: true, message: 'Meeting cancelled successfully' }, 'the call after the refusals is answered')
      const elapsed = performance.now() - started
      t.ok(elapsed < timeoutMs / 2, `answered in ${Math.round(elapsed)} ms, without waiting for a connection`)
      t.equal(sandbox.control.calls.length, 1, 'only the call the gate let by reached the upstream')
    })
  }
})

t.test('a gate admission that uses up the deadline gives the connection back', async (t) => {
  // The org budget's Redis round trip takes the whole deadline: that call is never sent, and its
  // connection's slot must come back for the next one.
  const timeoutMs = 300
  let slow = true
  const gate: UpstreamGate = {
    async acquire () {
      if (!slow) return
      slow = false
      await sleepAtLeast(timeoutMs)
    },
    onRateLimited: async () => {}
  }
  const { sandbox, client } = await setup(t, { timeoutMs, connections: 1, gate })
  t.match(await failureOf(cancelAlice(client)), { statusCode: 504, code: ErrorCode.UPSTREAM_TIMEOUT, outcome: 'not-sent' }, 'admitted after its deadline: not sent')
  t.equal(sandbox.control.calls.length, 0)
  // Had the slot been lost, this call would wait for it to its deadline, and be a 504.
  t.same(await settled(cancelAlice(client)), { status: 200, success: true, message: 'Meeting cancelled successfully' }, 'the next call gets the connection')
})

t.test('a connection given back passes over every queued call that expired, not just the first', async (t) => {
  // One connection, held by a call whose admission by the gate we keep open; two calls queue for
  // it and expire. Handed to the second dead waiter, the connection would be lost for good.
  const timeoutMs = 300
  let admitHolder = (): void => {}
  const holding = new Promise<void>((resolve) => { admitHolder = resolve })
  let first = true
  const gate: UpstreamGate = {
    async acquire () {
      if (!first) return
      first = false
      await holding
    },
    onRateLimited: async () => {}
  }
  const { sandbox, client } = await setup(t, { timeoutMs, connections: 1, gate })
  // Sent or not once admitted (its deadline is about spent), the holder gives its connection back.
  const holder = settled(client.fetchAppointments(ALICE.email, CTX))
  const queued = await Promise.all([failureOf(cancelAlice(client)), failureOf(cancelAlice(client))])
  for (const error of queued) t.match(error, { statusCode: 504, code: ErrorCode.UPSTREAM_TIMEOUT, outcome: 'not-sent' }, 'expired while queued')
  admitHolder()
  await holder
  const sent = sandbox.control.calls.length
  // Had the slot been lost, this call would wait for it to its deadline, and be a 504.
  const list = await settled(client.fetchAppointments(ALICE.email, CTX))
  t.ok(Array.isArray(list) && list.length === 3, 'the call after them gets the connection')
  t.equal(sandbox.control.calls.length, sent + 1, 'and it reached the upstream')
})

t.test('ten connections by default: the eleventh concurrent call waits for one', async (t) => {
  const { client, log } = await setup(t)
  // A call is asked through the gate once it holds a connection's slot: at once when one is free.
  const calls = Array.from({ length: 11 }, async () => await client.fetchAppointments(ALICE.email, CTX))
  t.equal(log.acquired.length, 10, 'ten calls hold a connection, the eleventh waits')
  const lists = await Promise.all(calls)
  t.equal(log.acquired.length, 11, 'the eleventh went once a connection came back')
  t.ok(lists.every((list) => list.length === 3))
})

t.test('a request whose deadline passes while its connection is being made is never sent', async (t) => {
  const { baseUrl, requests } = await countingUpstream(t)
  // Connecting takes longer than the deadline (a slow handshake): the deadline passes first, and
  // the connection, once made, must not carry the request.
  const connector = buildConnector({})
  const slowConnect: buildConnector.connector = (options, callback) => { setTimeout(() => { connector(options, callback) }, 200) }
  const client = createCare360Client({ baseUrl, apiKey: SANDBOX_KEY, timeoutMs: 100, connect: slowConnect })
  t.teardown(() => client.close())
  t.match(await failureOf(cancelAlice(client)), { statusCode: 504, code: ErrorCode.UPSTREAM_TIMEOUT, outcome: 'not-sent' })
  await sleep(250)
  t.equal(requests(), 0, 'the upstream never received it')
})

t.test('requests that expire while queued leave the pool\'s socket alive for the next one', async (t) => {
  let connections = 0
  let requests = 0
  const baseUrl = await stubUpstream(t, (request, response) => {
    requests++
    request.resume()
    setTimeout(() => { response.setHeader('content-type', 'application/json'); response.end('{"status":200,"success":true,"message":"ok"}') }, 150)
  }, () => { connections++ })
  const observed: string[] = []
  const client = createCare360Client({ baseUrl, apiKey: SANDBOX_KEY, timeoutMs: 500, connections: 1, observe: (_endpoint, outcome) => { observed.push(outcome) } })
  t.teardown(() => client.close())
  // One socket, 150 ms an answer, a 500 ms deadline: three answered (about), the next cut in
  // flight (its socket goes with it), the rest expire in the queue.
  const outcomes = await Promise.all(Array.from({ length: 8 }, async () => await client.cancelAppointment({ email: ALICE.email, appointmentId: ALICE_FIRST }, CTX).then(() => 'ok', (error: { outcome: string }) => error.outcome)))
  const count = (outcome: string): number => outcomes.filter((seen) => seen === outcome).length
  t.ok(count('not-sent') >= 2, `some expired in the queue: ${outcomes.join(', ')}`)
  t.equal(observed.filter((outcome) => outcome === 'timeout').length, count('not-sent') + count('unknown'), 'the metrics hear every call that ran out of time, queued or in flight')
  await sleep(100)
  t.equal(requests, count('ok') + count('unknown'), 'the expired ones were never written')
  // Before: each expired request destroyed the socket it was handed, so one more connection each.
  t.ok(connections <= 1 + count('unknown'), `a new connection only after a cut in flight: ${connections} connections, ${count('unknown')} cut`)
})

/**
 * A server that accepts TCP connections and never answers (a TLS handshake that never completes),
 * on a free loopback port; what it received, for the checks.
 */
async function silentServer (t: Test): Promise<{ port: number, received: Buffer[] }> {
  const received: Buffer[] = []
  const sockets = new Set<Socket>()
  const silent = createServer(function onConnection (socket) {
    sockets.add(socket)
    socket.on('data', (chunk) => received.push(chunk))
  })
  silent.listen(0, '127.0.0.1')
  await once(silent, 'listening')
  t.teardown(() => {
    for (const socket of sockets) socket.destroy()
    silent.close()
  })
  return { port: (silent.address() as AddressInfo).port, received }
}

t.test('a TLS handshake that does not complete in time: never sent, 504', async (t) => {
  const { port, received } = await silentServer(t)
  // undici's connect timeout ticks at ~0.5 s resolution; a short deadline passes first.
  const client = createCare360Client({ baseUrl: `https://127.0.0.1:${port}`, apiKey: SANDBOX_KEY, timeoutMs: 100 })
  t.teardown(() => client.close())
  const error = await failureOf(cancelAlice(client))
  t.match(error, { statusCode: 504, code: ErrorCode.UPSTREAM_TIMEOUT, outcome: 'not-sent', upstreamStatus: null })
  t.match(error.cause, { code: 'CARE360_DEADLINE' })
  const bytes = Buffer.concat(received)
  t.ok(bytes.length === 0 || bytes[0] === 0x16, 'at most a TLS handshake record reached the server')
  t.notMatch(bytes.toString('latin1'), SANDBOX_KEY)
})

t.test('a TLS handshake that does not complete within half the deadline: never sent, 502 unavailable', async (t) => {
  const { port } = await silentServer(t)
  // The connect timeout is half the deadline (1.5 s, give or take undici's 0.5 s tick): the
  // caller hears "unavailable" before the 3 s deadline would make it a 504.
  const client = createCare360Client({ baseUrl: `https://127.0.0.1:${port}`, apiKey: SANDBOX_KEY, timeoutMs: 3000 })
  t.teardown(() => client.close())
  const started = Date.now()
  const error = await failureOf(cancelAlice(client))
  const elapsed = Date.now() - started
  t.match(error, { statusCode: 502, code: ErrorCode.UPSTREAM_UNAVAILABLE, outcome: 'not-sent', upstreamStatus: null })
  t.match(error.cause, { code: 'UND_ERR_CONNECT_TIMEOUT' })
  t.ok(elapsed < 2700, `answered after ${elapsed} ms, well before the deadline`)
})

t.test('fetchAppointments', async (t) => {
  t.test('lists the patient\'s appointments, trimmed', async (t) => {
    const { sandbox, client, log } = await setup(t)
    const list = await client.fetchAppointments('Alice@Example.com', { requestId: 'req-list' })
    t.same(log.acquired, ['list'])
    t.equal(list.length, 3)
    const seeded = ALICE.appointments[0]!
    t.strictSame(Object.keys(list[0]!).sort(), ['agentEventId', 'agentName', 'end', 'id', 'start', 'status', 'title', 'topic'])
    t.match(list[0], { id: seeded.id, agentEventId: seeded.agentEventId, title: seeded.title, topic: seeded.topic, status: 'CONFIRMED', agentName: seeded.agentName })
    t.ok(Date.parse(list[0]!.start!) > Date.now())
    const call = sandbox.control.calls[0]!
    t.equal(call.method, 'GET')
    t.equal(call.path, '/api/v1/calendar/appointments')
    t.same(call.query, { user_email: 'Alice@Example.com' })
    t.same(Object.keys(call.headers).sort(), ['connection', 'cv-api-key', 'host', 'x-request-id'])
    t.equal(call.headers['x-request-id'], 'req-list')
    t.equal(call.body, undefined)
  })

  t.test('an email the upstream does not know is an empty list', async (t) => {
    const { client } = await setup(t)
    t.same(await client.fetchAppointments('nobody@example.com', CTX), [])
    t.same(await client.fetchAppointments(DEMO_PATIENTS[2]!.email, CTX), [])
  })

  t.test('a NotFoundError under another status (undocumented: 404 is inferred) is an empty list too', async (t) => {
    const { sandbox, client } = await setup(t)
    const named = [
      { success: false, message: 'NotFoundError', error: 'User not found' },
      { success: false, message: 'User not found', error: 'NotFoundError' },
      { success: false, message: 'User not found', code: 'NotFoundError' },
      { success: false, name: 'NotFoundError' }
    ]
    for (const [i, body] of named.entries()) {
      const status = [400, 422, 400, 409][i]!
      sandbox.control.setFailure({ kind: 'status', status, body, times: 1 })
      t.same(await client.fetchAppointments(ALICE.email, CTX), [], `${status} ${JSON.stringify(body)}`)
    }
    sandbox.control.setFailure({ kind: 'status', status: 400, body: { success: false, message: 'Invalid request', error: 'start_date is required' }, times: 1 })
    t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)), { statusCode: 400, code: ErrorCode.UPSTREAM_REJECTED }, 'another 400 is the upstream\'s refusal')
    sandbox.control.setFailure({ kind: 'status', status: 400, body: { success: true, error: 'NotFoundError' }, times: 1 })
    t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)), { statusCode: 400, code: ErrorCode.UPSTREAM_REJECTED }, 'only in an error envelope')
    // Only that name, exactly, and never with a 401 or 403 (a refused key is no empty list).
    sandbox.control.setFailure({ kind: 'status', status: 401, body: { success: false, error: 'NotFoundError' }, times: 1 })
    t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)), { statusCode: 502, code: ErrorCode.UPSTREAM_AUTH_FAILED }, 'a 401 naming it is still our key refused')
    sandbox.control.setFailure({ kind: 'status', status: 403, body: { success: false, message: 'OrganizationNotFoundError: key revoked' }, times: 1 })
    t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR }, 'a 403 is an error')
    sandbox.control.setFailure({ kind: 'status', status: 400, body: { success: false, error: 'ApiKeyNotFoundError' }, times: 1 })
    t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)), { statusCode: 400, code: ErrorCode.UPSTREAM_REJECTED }, 'another error whose name contains it')
    sandbox.control.setFailure({ kind: 'status', status: 400, body: 'NotFoundError', headers: { 'content-type': 'text/plain' }, times: 1 })
    t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR }, 'not without the envelope')
    sandbox.control.setFailure({ kind: 'status', status: 500, body: named[0], times: 1 })
    t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR }, 'a 5xx is the upstream failing, whatever it names')
  })

  t.test('a 404 in the upstream\'s error envelope is an empty list, even when it does not name NotFoundError', async (t) => {
    const { sandbox, client } = await setup(t)
    sandbox.control.setFailure({ kind: 'status', status: 404, body: { status: 404, success: false, message: 'User not found' }, endpoint: 'list', times: 1 })
    t.same(await settled(client.fetchAppointments(ALICE.email, CTX)), [], 'a 404 with success false is no appointments')
  })

  t.test('a NotFoundError under 410 (Gone) is an empty list', async (t) => {
    const { sandbox, client } = await setup(t)
    sandbox.control.setFailure({ kind: 'status', status: 410, body: { success: false, error: 'NotFoundError' }, endpoint: 'list', times: 1 })
    t.same(await settled(client.fetchAppointments(ALICE.email, CTX)), [], 'a 410 naming NotFoundError is no appointments')
  })

  t.test('a cancel the upstream answers with its NotFoundError is the contract\'s 404, answered', async (t) => {
    const { sandbox, client } = await setup(t)
    for (const [status, body] of [[404, { success: false, error: 'NotFoundError' }], [400, { success: false, message: 'NotFoundError', error: 'Appointment not found' }], [422, { success: false, name: 'NotFoundError' }]] as const) {
      sandbox.control.setFailure({ kind: 'status', status, body, endpoint: 'cancel', times: 1 })
      t.match(await failureOf(cancelAlice(client)), { statusCode: 404, code: ErrorCode.APPOINTMENT_NOT_FOUND, outcome: 'answered', upstreamStatus: status, message: 'No such upcoming appointment' }, String(status))
    }
    sandbox.control.setFailure({ kind: 'status', status: 400, body: { success: false, message: 'Invalid request', error: 'Appointment not found' }, endpoint: 'cancel', times: 1 })
    t.match(await failureOf(cancelAlice(client)), { statusCode: 400, code: ErrorCode.UPSTREAM_REJECTED }, 'another 400 is the upstream\'s refusal, passed through')
    sandbox.control.setFailure({ kind: 'status', status: 404, body: { success: false, message: 'Not Found' }, endpoint: 'cancel', times: 1 })
    t.match(await failureOf(cancelAlice(client)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, upstreamStatus: 404 }, 'a 404 that does not name it is no answer about the appointment')
  })

  t.test('a JSON body led by a byte order mark is read (RFC 8259, 8.1)', async (t) => {
    const { sandbox, client } = await setup(t)
    sandbox.control.setFailure({ kind: 'status', status: 200, body: '\uFEFF{"status":200,"success":true,"message":"Meeting cancelled successfully"}', headers: { 'content-type': 'application/json' }, endpoint: 'cancel', times: 1 })
    t.same(await cancelAlice(client), { status: 200, success: true, message: 'Meeting cancelled successfully' })
    sandbox.control.setFailure({ kind: 'status', status: 200, body: '\uFEFF\uFEFF{"status":200,"success":true,"data":[]}', headers: { 'content-type': 'application/json' }, endpoint: 'list', times: 1 })
    t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)), { code: ErrorCode.UPSTREAM_ERROR }, 'one mark only')
  })

  t.test('a 404 that is not the upstream\'s envelope is an error', async (t) => {
    const { sandbox, client } = await setup(t)
    sandbox.control.setFailure({ kind: 'status', status: 404, body: 'Cannot GET', times: 1 })
    t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, upstreamStatus: 404 })
    sandbox.control.setFailure({ kind: 'status', status: 404, body: { status: 404 }, times: 1 })
    t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)), { code: ErrorCode.UPSTREAM_ERROR, upstreamStatus: 404 })
  })

  t.test('odd items are skipped or trimmed, never fatal', async (t) => {
    const { sandbox, client } = await setup(t)
    sandbox.control.setFailure({
      kind: 'status',
      status: 200,
      body: {
        status: 200,
        success: true,
        data: [
          { id: 'a', startDateTime: '2031-01-01T10:00:00Z', endDateTime: '2031-01-01T11:00:00Z', title: 7, status: 'RESCHEDULED', secret: 'x', case: { id: 'c' } },
          { id: 42 },
          { id: '' },
          null,
          'text',
          { id: 'b', start: '2031-01-02T10:00:00Z', startDateTime: 'ignored', agentEventId: 'e', agentName: 'Dr. X', topic: 'T' },
          // Never listed, the documentation says: left out if listed anyway.
          { id: 'deleted', isDeleted: true, status: 'CONFIRMED' },
          { id: 'cancelled', status: 'CANCELLED' },
          { id: 'canceled', status: 'canceled' },
          { id: 'c', isDeleted: false, status: 'CANCELLATION_REQUESTED' },
          // Nor ended ones.
          { id: 'ended', start: '2020-01-01T10:00:00Z', end: '2020-01-01T11:00:00Z' },
          { id: 'ended-too', endDateTime: '2020-01-01T11:00:00Z' }
        ]
      },
      times: 1
    })
    t.strictSame(await client.fetchAppointments(ALICE.email, CTX), [
      { id: 'a', agentEventId: null, title: null, topic: null, start: '2031-01-01T10:00:00Z', end: '2031-01-01T11:00:00Z', status: 'RESCHEDULED', agentName: null },
      { id: 'b', agentEventId: 'e', title: null, topic: 'T', start: '2031-01-02T10:00:00Z', end: null, status: null, agentName: 'Dr. X' },
      { id: 'c', agentEventId: null, title: null, topic: null, start: null, end: null, status: 'CANCELLATION_REQUESTED', agentName: null }
    ])
  })

  t.test('data that is not a list, or success false, is an upstream error', async (t) => {
    const { sandbox, client } = await setup(t)
    for (const body of [{ success: true, data: {} }, { success: true }, { success: false, data: [] }, { data: [] }, { success: 'true', data: [] }]) {
      sandbox.control.setFailure({ kind: 'status', status: 200, body, times: 1 })
      t.match(await failureOf(client.fetchAppointments(ALICE.email, CTX)), { statusCode: 502, code: ErrorCode.UPSTREAM_ERROR, outcome: 'answered' })
    }
  })

  t.test('a base URL with a trailing slash still reaches the right path', async (t) => {
    const sandbox = await startSandbox(t)
    const client = createCare360Client({ baseUrl: `${sandbox.url}/`, apiKey: SANDBOX_KEY, timeoutMs: 3000 })
    t.teardown(() => client.close())
    t.equal((await client.fetchAppointments(ALICE.email, CTX)).length, 3)
  })
})

t.test('the gate is asked before every call and can stop it', async (t) => {
  const sandbox = await startSandbox(t)
  const asked: UpstreamEndpoint[] = []
  let open = true
  const client = createCare360Client({
    baseUrl: sandbox.url,
    apiKey: SANDBOX_KEY,
    timeoutMs: 3000,
    gate: {
      async acquire (endpoint) {
        asked.push(endpoint)
        // The gate runs before anything is sent.
        t.equal(sandbox.control.calls.length, open ? asked.length - 1 : 2)
        if (!open) throw new ApiError(429, ErrorCode.UPSTREAM_RATE_LIMITED, 'budget spent', { headers: { 'Retry-After': '3' } })
      },
      async onRateLimited () {}
    }
  })
  t.teardown(() => client.close())
  await client.fetchAppointments(ALICE.email, CTX)
  await cancelAlice(client)
  t.same(asked, ['list', 'cancel'])
  open = false
  await t.rejects(cancelAlice(client), { statusCode: 429, code: ErrorCode.UPSTREAM_RATE_LIMITED, headers: { 'Retry-After': '3' } })
  await t.rejects(client.fetchAppointments(ALICE.email, CTX), { statusCode: 429, code: ErrorCode.UPSTREAM_RATE_LIMITED })
  t.equal(sandbox.control.calls.length, 2, 'nothing reached the upstream once the gate said no')
})

t.test('the default gate lets every call through', async (t) => {
  const sandbox = await startSandbox(t)
  const client = createCare360Client({ baseUrl: sandbox.url, apiKey: SANDBOX_KEY, timeoutMs: 3000 })
  t.teardown(() => client.close())
  sandbox.control.setFailure({ kind: 'rate-limited', times: 1 })
  t.match(await failureOf(cancelAlice(client)), { statusCode: 429, headers: { 'Retry-After': '1' } })
  t.same(await cancelAlice(client), { status: 200, success: true, message: 'Meeting cancelled successfully' })
})

t.test('the observer hears every call that passed the gate, with its outcome and duration', async (t) => {
  const sandbox = await startSandbox(t)
  const heard: Array<[UpstreamEndpoint, UpstreamCallOutcome, number]> = []
  let open = true
  const client = createCare360Client({
    baseUrl: sandbox.url,
    apiKey: SANDBOX_KEY,
    timeoutMs: 300,
    gate: {
      async acquire () {
        if (!open) throw new ApiError(429, ErrorCode.UPSTREAM_RATE_LIMITED, 'budget spent')
      },
      async onRateLimited () {}
    },
    observe (endpoint, outcome, seconds) { heard.push([endpoint, outcome, seconds]) }
  })
  t.teardown(() => client.close())
  await client.fetchAppointments(ALICE.email, CTX)
  t.same(await client.fetchAppointments('nobody@example.com', CTX), [], "the upstream's not-found is an ok list")
  await cancelAlice(client)
  await failureOf(client.cancelAppointment({ email: ALICE.email, appointmentId: DEMO_PATIENTS[1]!.appointments[0]!.id }, CTX))
  sandbox.control.setFailure({ kind: 'rate-limited', times: 1 })
  await failureOf(cancelAlice(client))
  sandbox.control.setFailure({ kind: 'garbage', times: 1 })
  await failureOf(client.fetchAppointments(ALICE.email, CTX))
  sandbox.control.setFailure({ kind: 'slow', delayMs: 600, times: 1 })
  await failureOf(client.fetchAppointments(ALICE.email, CTX))
  // A 200 whose envelope the client cannot use is an error, although the exchange went well.
  sandbox.control.setFailure({ kind: 'status', status: 200, body: { success: false }, times: 1 })
  await failureOf(cancelAlice(client))
  open = false
  await t.rejects(client.fetchAppointments(ALICE.email, CTX), { code: ErrorCode.UPSTREAM_RATE_LIMITED })
  t.same(heard.map(([endpoint, outcome]) => [endpoint, outcome]), [
    ['list', 'ok'], ['list', 'ok'], ['cancel', 'ok'], ['cancel', 'rejected'], ['cancel', 'rate_limited'],
    ['list', 'error'], ['list', 'timeout'], ['cancel', 'error']
  ], 'the call the gate stopped is not heard')
  for (const [, outcome, seconds] of heard) t.ok(seconds >= 0 && seconds < 5, `${outcome}: ${seconds} s`)
  t.ok((heard[6]?.[2] ?? 0) >= 0.29, 'the timeout lasted the deadline')

  const wrongKey = createCare360Client({ baseUrl: sandbox.url, apiKey: 'wrong-key', timeoutMs: 3000, observe (endpoint, outcome) { heard.push([endpoint, outcome, 0]) } })
  t.teardown(() => wrongKey.close())
  await failureOf(wrongKey.fetchAppointments(ALICE.email, CTX))
  const refused = createCare360Client({ baseUrl: `http://127.0.0.1:${await freePort()}`, apiKey: SANDBOX_KEY, timeoutMs: 3000, observe (endpoint, outcome) { heard.push([endpoint, outcome, 0]) } })
  t.teardown(() => refused.close())
  await failureOf(refused.cancelAppointment({ email: ALICE.email, appointmentId: ALICE_FIRST }, CTX))
  t.same(heard.slice(8).map(([endpoint, outcome]) => [endpoint, outcome]), [['list', 'auth_failed'], ['cancel', 'unavailable']])
})

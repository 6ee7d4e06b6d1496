import { setTimeout as sleep } from 'node:timers/promises'
import t, { type Test } from 'tap'
import { request } from 'undici'
import { buildSandbox, DEMO_PATIENTS, type SandboxAppointment } from '../../src/care360/sandbox.js'
import { SANDBOX_KEY, startSandbox, type RunningSandbox } from '../helpers/sandbox.js'

const LIST = '/api/v1/calendar/appointments'
const CANCEL = '/api/v1/calendar/appointments/cancel'
const [ALICE, BOB, CAROL] = DEMO_PATIENTS as [typeof DEMO_PATIENTS[0], typeof DEMO_PATIENTS[0], typeof DEMO_PATIENTS[0]]

interface Answer { status: number, headers: Record<string, unknown>, body: any }

async function call (sandbox: RunningSandbox, method: 'GET' | 'POST', path: string, options: { body?: string | object, headers?: Record<string, string>, key?: string | null } = {}): Promise<Answer> {
  const headers: Record<string, string> = { ...options.headers }
  if (options.key !== null) headers['cv-api-key'] = options.key ?? SANDBOX_KEY
  let body: string | undefined
  if (typeof options.body === 'object') {
    body = JSON.stringify(options.body)
    headers['content-type'] ??= 'application/json'
  } else {
    body = options.body
  }
  const answer = await request(`${sandbox.url}${path}`, { method, headers, body })
  const text = await answer.body.text()
  let parsed: unknown = text
  try { parsed = JSON.parse(text) } catch {}
  return { status: answer.statusCode, headers: answer.headers, body: parsed }
}

function list (sandbox: RunningSandbox, query: string): Promise<Answer> {
  return call(sandbox, 'GET', `${LIST}?${query}`)
}

function cancel (sandbox: RunningSandbox, body: object): Promise<Answer> {
  return call(sandbox, 'POST', CANCEL, { body })
}

function invalid (t: Test, answer: Answer, error: string | RegExp): void {
  t.equal(answer.status, 400)
  t.match(answer.body, { status: 400, success: false, message: 'Invalid request', error })
}

t.test('the demo seed', async (t) => {
  t.same(DEMO_PATIENTS.map((p) => [p.email, p.appointments.length]), [['alice@example.com', 3], ['bob@example.com', 3], ['carol@example.com', 0]])
  const sandbox = await startSandbox(t)
  const answer = await list(sandbox, `user_email=${ALICE.email}`)
  t.equal(answer.status, 200)
  t.match(answer.body, { status: 200, success: true, message: 'Appointments fetched successfully' })
  const items = answer.body.data as SandboxAppointment[]
  t.same(items.map((item) => item.id), ALICE.appointments.map((a) => a.id))
  const first = items[0]!
  t.same(Object.keys(first).sort(), ['agentEventId', 'agentName', 'case', 'color', 'createdAt', 'description', 'end', 'id', 'isDeleted', 'isEditable', 'meetingDetails', 'start', 'status', 'title', 'topic', 'updatedAt'])
  t.match(first, { status: 'CONFIRMED', isDeleted: false, case: { id: /^[0-9a-f-]{36}$/ } })
  t.not(first.id, first.agentEventId)
  t.ok(Date.parse(first.start) > Date.now() && Date.parse(first.end) > Date.parse(first.start))
  t.same((await list(sandbox, `user_email=${CAROL.email}`)).body.data, [])
})

t.test('authentication: the organization key', async (t) => {
  const sandbox = await startSandbox(t)
  for (const key of [null, 'wrong', '']) {
    const answer = await call(sandbox, 'GET', `${LIST}?user_email=${ALICE.email}`, { key })
    t.equal(answer.status, 401, String(key))
    t.strictSame(answer.body, { status: 401, success: false, message: 'Unauthorized' })
  }
  const answer = await call(sandbox, 'POST', CANCEL, { key: 'wrong', body: { email: ALICE.email, appointmentId: ALICE.appointments[0]!.id } })
  t.equal(answer.status, 401)
  t.notOk(sandbox.control.isCancelled(ALICE.appointments[0]!.id))
})

t.test('quota: a sliding window over both endpoints', async (t) => {
  const sandbox = await startSandbox(t, { quota: { count: 2, windowMs: 600 } })
  t.equal((await list(sandbox, `user_email=${ALICE.email}`)).status, 200)
  await sleep(300)
  t.equal((await cancel(sandbox, { email: 'x@example.com', appointmentId: 'none' })).status, 400, 'counted, then judged')
  const limited = await list(sandbox, `user_email=${ALICE.email}`)
  t.equal(limited.status, 429)
  t.strictSame(limited.body, { status: 429, success: false, message: 'Rate limit exceeded' })
  t.equal(limited.headers['retry-after'], '1')
  // Just after the first call leaves the window, while the second is still in it: one slot
  // frees up, not a whole fresh window.
  const first = sandbox.control.calls[0]!
  const second = sandbox.control.calls[1]!
  await sleep(first.at + 600 + 20 - Date.now())
  t.equal((await list(sandbox, `user_email=${ALICE.email}`)).status, 200)
  t.ok(Date.now() < second.at + 600, 'still within the second call\'s window')
  t.equal((await list(sandbox, `user_email=${ALICE.email}`)).status, 429)
  sandbox.control.reset()
  t.equal((await list(sandbox, `user_email=${ALICE.email}`)).status, 200, 'reset forgets the window')
})

t.test('quota: Retry-After can be left out, default is 500 per minute', async (t) => {
  const quiet = await startSandbox(t, { quota: { count: 1, windowMs: 60_000, sendRetryAfter: false } })
  await list(quiet, `user_email=${ALICE.email}`)
  const limited = await list(quiet, `user_email=${ALICE.email}`)
  t.equal(limited.status, 429)
  t.equal(limited.headers['retry-after'], undefined)

  // Through inject: 501 calls over sockets would take seconds and prove nothing more.
  const { app: standard } = await buildSandbox({ apiKey: SANDBOX_KEY })
  t.teardown(() => standard.close())
  const answers = await Promise.all(Array.from({ length: 501 }, () =>
    standard.inject({ url: `${LIST}?user_email=${CAROL.email}`, headers: { 'cv-api-key': SANDBOX_KEY } })))
  t.equal(answers.filter((a) => a.statusCode === 200).length, 500)
  const limited429 = answers.filter((a) => a.statusCode === 429)
  t.equal(limited429.length, 1)
  t.match(limited429[0]!.headers['retry-after'], /^(5[89]|60)$/)
})

t.test('fetch appointments: query rules', async (t) => {
  const sandbox = await startSandbox(t)
  t.equal((await list(sandbox, 'user_email=ALICE@Example.COM')).body.data.length, 3, 'email is case-insensitive')
  const unknown = await list(sandbox, 'user_email=nobody@example.com')
  t.equal(unknown.status, 404)
  t.strictSame(unknown.body, { status: 404, success: false, message: 'NotFoundError', error: 'User not found' })
  invalid(t, await list(sandbox, ''), /required when user_email is absent/)
  invalid(t, await list(sandbox, 'user_email='), /must not be empty/)
  invalid(t, await list(sandbox, `user_email=${ALICE.email}&start_date=2030-01-01`), /together/)
  invalid(t, await list(sandbox, 'end_date=2030-01-01'), /required/)
  invalid(t, await list(sandbox, 'start_date=2030-1-1&end_date=2030-01-02'), /YYYY-MM-DD/)
  invalid(t, await list(sandbox, 'start_date=2030-02-30&end_date=2030-03-02'), /YYYY-MM-DD/)
  invalid(t, await list(sandbox, 'start_date=2030-01-02&end_date=2030-01-01'), /after/)

  const day = (offset: number): string => new Date(Date.now() + offset * 86_400_000).toISOString().slice(0, 10)
  // Every seeded appointment of both patients falls within 31 days; only Bob's first is within today..tomorrow.
  const everyone = await list(sandbox, `start_date=${day(0)}&end_date=${day(31)}`)
  t.equal(everyone.body.data.length, 6)
  const ends = everyone.body.data.map((item: SandboxAppointment) => Date.parse(item.end))
  t.same(ends, [...ends].sort((a, b) => a - b), 'sorted by end, ascending')
  const soon = await list(sandbox, `user_email=${BOB.email}&start_date=${day(-1)}&end_date=${day(0)}&start_date=ignored`)
  t.same(soon.body.data.map((item: SandboxAppointment) => item.id), [BOB.appointments[0]!.id].filter(() => new Date(Date.now() + 4 * 3_600_000).toISOString().slice(0, 10) === day(0)))
  t.same((await list(sandbox, `start_date=${day(400)}&end_date=${day(401)}`)).body.data, [])
})

t.test('fetch appointments: never cancelled, deleted or ended ones', async (t) => {
  const sandbox = await startSandbox(t)
  const ended = sandbox.control.seedAppointment('dave@example.com', { start: new Date(Date.now() - 7_200_000).toISOString(), end: new Date(Date.now() - 3_600_000).toISOString() })
  const deleted = sandbox.control.seedAppointment('dave@example.com', { isDeleted: true })
  const later = sandbox.control.seedAppointment('Dave@example.com', { start: new Date(Date.now() + 7_200_000).toISOString() })
  const sooner = sandbox.control.seedAppointment('dave@example.com', { title: 'Soon' })
  t.equal(sooner.title, 'Soon')
  t.equal(Date.parse(sooner.end) - Date.parse(sooner.start), 30 * 60_000)
  // Defaults to tomorrow, so the one in two hours ends first.
  t.same((await list(sandbox, 'user_email=dave@example.com')).body.data.map((i: SandboxAppointment) => i.id), [later.id, sooner.id])
  t.equal((await cancel(sandbox, { email: 'dave@example.com', appointmentId: later.id })).status, 200)
  t.same((await list(sandbox, 'user_email=DAVE@example.com')).body.data.map((i: SandboxAppointment) => i.id), [sooner.id])
  invalid(t, await cancel(sandbox, { email: 'dave@example.com', appointmentId: ended.id }), 'Appointment has already ended')
  invalid(t, await cancel(sandbox, { email: 'dave@example.com', appointmentId: deleted.id }), 'Appointment not found')
  sandbox.control.reset()
  t.equal((await list(sandbox, 'user_email=dave@example.com')).status, 404, 'reset goes back to the seed')
})

t.test('cancel: validation', async (t) => {
  const sandbox = await startSandbox(t)
  const id = ALICE.appointments[0]!.id
  invalid(t, await call(sandbox, 'POST', CANCEL, { body: `email=${ALICE.email}`, headers: { 'content-type': 'application/x-www-form-urlencoded' } }), /Content-Type/)
  invalid(t, await call(sandbox, 'POST', CANCEL, { body: '' }), /Content-Type/)
  invalid(t, await call(sandbox, 'POST', CANCEL, { body: '{"email":', headers: { 'content-type': 'application/json; charset=utf-8' } }), /valid JSON/)
  invalid(t, await call(sandbox, 'POST', CANCEL, { body: '', headers: { 'content-type': 'application/json' } }), /valid JSON/)
  invalid(t, await cancel(sandbox, [ALICE.email, id]), /JSON object/)
  invalid(t, await call(sandbox, 'POST', CANCEL, { body: 'null', headers: { 'content-type': 'application/json' } }), /JSON object/)
  invalid(t, await cancel(sandbox, { appointmentId: id }), /email/)
  invalid(t, await cancel(sandbox, { email: '', appointmentId: id }), /email/)
  invalid(t, await cancel(sandbox, { email: ALICE.email }), /appointmentId/)
  invalid(t, await cancel(sandbox, { email: ALICE.email, appointmentId: 7 }), /appointmentId/)
  invalid(t, await cancel(sandbox, { email: ALICE.email, appointmentId: id, reason: 5 }), /reason/)
  t.notOk(sandbox.control.isCancelled(id))
  t.equal(sandbox.control.calls.length, 11, 'every request recorded')
})

t.test('cancel: semantics', async (t) => {
  const sandbox = await startSandbox(t)
  const [first, second] = ALICE.appointments as [typeof ALICE.appointments[0], typeof ALICE.appointments[0]]
  invalid(t, await cancel(sandbox, { email: ALICE.email, appointmentId: '00000000-0000-4000-8000-000000000000' }), 'Appointment not found')
  invalid(t, await cancel(sandbox, { email: BOB.email, appointmentId: first.id }), 'Appointment does not belong to this invitee')
  const done = await cancel(sandbox, { email: 'ALICE@example.com', appointmentId: first.id, reason: 'better' })
  t.equal(done.status, 200)
  t.strictSame(done.body, { status: 200, success: true, message: 'Meeting cancelled successfully' })
  t.ok(sandbox.control.isCancelled(first.id))
  invalid(t, await cancel(sandbox, { email: ALICE.email, appointmentId: first.id }), 'Appointment is already cancelled')
  t.equal((await cancel(sandbox, { email: ALICE.email, appointmentId: second.agentEventId, extra: true })).status, 200, 'by agentEventId too')
  t.ok(sandbox.control.isCancelled(second.id))
  t.notOk(sandbox.control.isCancelled('unknown'))
  t.same((await list(sandbox, `user_email=${ALICE.email}`)).body.data.map((i: SandboxAppointment) => i.id), [ALICE.appointments[2]!.id])
  sandbox.control.reset()
  t.notOk(sandbox.control.isCancelled(first.id))
  t.equal(sandbox.control.calls.length, 0)
})

t.test('recorded calls', async (t) => {
  const sandbox = await startSandbox(t)
  await call(sandbox, 'POST', `${CANCEL}?x=1`, { body: 'not json', headers: { 'content-type': 'text/plain', 'X-Custom': 'A' } })
  const recorded = sandbox.control.calls[0]!
  t.match(recorded, { method: 'POST', path: CANCEL, query: { x: '1' }, body: 'not json', headers: { 'x-custom': 'A', 'cv-api-key': SANDBOX_KEY } })
  t.type(recorded.at, 'number')
  t.equal((await call(sandbox, 'GET', '/elsewhere')).status, 404)
  t.equal(sandbox.control.calls.length, 1, 'only the calendar endpoints are recorded')
})

t.test('recorded calls are bounded: the latest ones are kept', async (t) => {
  const sandbox = await startSandbox(t, { maxRecordedCalls: 3 })
  const lengths: number[] = []
  for (let n = 1; n <= 8; n++) {
    await list(sandbox, `email=n${n}@example.com`)
    lengths.push(sandbox.control.calls.length)
  }
  t.same(lengths, [1, 2, 3, 4, 5, 3, 4, 5], 'at least 3 and fewer than 6, the oldest half dropped at once')
  t.same(sandbox.control.calls.map((call) => call.query.email), ['n4@example.com', 'n5@example.com', 'n6@example.com', 'n7@example.com', 'n8@example.com'], 'in order, the latest last')
})

t.test('failure modes', async (t) => {
  t.test('status, one-shot, scoped to an endpoint', async (t) => {
    const sandbox = await startSandbox(t)
    sandbox.control.setFailure({ kind: 'status', status: 503, endpoint: 'cancel', times: 2 })
    t.equal((await list(sandbox, `user_email=${ALICE.email}`)).status, 200, 'other endpoint untouched')
    const first = await cancel(sandbox, { email: ALICE.email, appointmentId: ALICE.appointments[0]!.id })
    t.equal(first.status, 503)
    t.strictSame(first.body, { status: 503, success: false, message: 'Service Unavailable' })
    t.equal((await cancel(sandbox, {})).status, 503)
    t.equal((await cancel(sandbox, {})).status, 400, 'used up')
    t.notOk(sandbox.control.isCancelled(ALICE.appointments[0]!.id))

    sandbox.control.setFailure({ kind: 'status', status: 599, body: 'plain', headers: { 'x-extra': 'yes' } })
    const odd = await list(sandbox, '')
    t.match(odd, { status: 599, body: 'plain', headers: { 'x-extra': 'yes', 'content-type': /text\/plain/ } })
    t.equal((await list(sandbox, '')).status, 599, 'until cleared')
    sandbox.control.setFailure({ kind: 'status', status: 599 })
    t.strictSame((await list(sandbox, '')).body, { status: 599, success: false, message: 'Unknown' })
    sandbox.control.clearFailure()
    t.equal((await list(sandbox, '')).status, 400)
    t.throws(() => sandbox.control.setFailure({ kind: 'nope' } as never), TypeError)
  })

  t.test('rate-limited, garbage, huge', async (t) => {
    const sandbox = await startSandbox(t)
    sandbox.control.setFailure({ kind: 'rate-limited', times: 1 })
    t.match(await list(sandbox, ''), { status: 429, headers: { 'retry-after': '1' }, body: { message: 'Rate limit exceeded' } })
    sandbox.control.setFailure({ kind: 'rate-limited', retryAfter: 'Wed, 21 Oct 2037 07:28:00 GMT', times: 1 })
    t.match(await list(sandbox, ''), { status: 429, headers: { 'retry-after': 'Wed, 21 Oct 2037 07:28:00 GMT' } })
    sandbox.control.setFailure({ kind: 'rate-limited', retryAfter: null, times: 1 })
    const bare = await list(sandbox, '')
    t.equal(bare.status, 429)
    t.notOk('retry-after' in bare.headers)
    sandbox.control.setFailure({ kind: 'garbage', times: 1 })
    t.match(await list(sandbox, ''), { status: 200, headers: { 'content-type': /text\/html/ }, body: /<html>/ })
    sandbox.control.setFailure({ kind: 'huge', times: 1 })
    const huge = await list(sandbox, '')
    t.equal(huge.status, 200)
    t.ok(JSON.stringify(huge.body).length > 1024 * 1024)
    t.ok(Array.isArray(huge.body.data))
  })

  t.test('reset: the socket dies before anything is applied', async (t) => {
    const sandbox = await startSandbox(t)
    sandbox.control.setFailure({ kind: 'reset', times: 1 })
    await t.rejects(cancel(sandbox, { email: ALICE.email, appointmentId: ALICE.appointments[0]!.id }))
    t.notOk(sandbox.control.isCancelled(ALICE.appointments[0]!.id))
    sandbox.control.setFailure({ kind: 'reset-after-apply', times: 1 })
    await t.rejects(cancel(sandbox, { email: ALICE.email, appointmentId: ALICE.appointments[0]!.id }))
    t.ok(sandbox.control.isCancelled(ALICE.appointments[0]!.id))
    t.equal(sandbox.control.calls.length, 2)
  })

  t.test('slow: applied late, or not at all when the caller hung up', async (t) => {
    const sandbox = await startSandbox(t)
    const [first, second, third] = ALICE.appointments as [typeof ALICE.appointments[0], typeof ALICE.appointments[0], typeof ALICE.appointments[0]]
    sandbox.control.setFailure({ kind: 'slow', delayMs: 60, times: 1 })
    const started = Date.now()
    t.equal((await cancel(sandbox, { email: ALICE.email, appointmentId: first.id })).status, 200)
    t.ok(Date.now() - started >= 55)

    sandbox.control.setFailure({ kind: 'slow', delayMs: 400, times: 1 })
    await t.rejects(request(`${sandbox.url}${CANCEL}`, {
      method: 'POST',
      headers: { 'cv-api-key': SANDBOX_KEY, 'content-type': 'application/json' },
      body: JSON.stringify({ email: ALICE.email, appointmentId: second.id }),
      signal: AbortSignal.timeout(40)
    }))
    await sleep(450)
    t.notOk(sandbox.control.isCancelled(second.id), 'the abandoned cancel was dropped')

    sandbox.control.setFailure({ kind: 'slow-after-apply', delayMs: 400, times: 1 })
    await t.rejects(request(`${sandbox.url}${CANCEL}`, {
      method: 'POST',
      headers: { 'cv-api-key': SANDBOX_KEY, 'content-type': 'application/json' },
      body: JSON.stringify({ email: ALICE.email, appointmentId: third.id }),
      signal: AbortSignal.timeout(40)
    }))
    const end = Date.now() + 2000
    while (!sandbox.control.isCancelled(third.id) && Date.now() < end) await sleep(5)
    t.ok(sandbox.control.isCancelled(third.id), 'applied before the delay')
  })

  t.test('a failure that breaks the sandbox itself is a 500 envelope', async (t) => {
    const sandbox = await startSandbox(t)
    sandbox.control.setFailure({ kind: 'status', status: 200, body: { big: 1n }, times: 1 })
    t.match(await list(sandbox, ''), { status: 500, body: { status: 500, success: false, message: 'Internal server error' } })
  })
})

t.test('framework errors and unknown paths answer the envelope', async (t) => {
  const sandbox = await startSandbox(t)
  t.strictSame((await call(sandbox, 'GET', '/api/v1/unknown')).body, { status: 404, success: false, message: 'Not Found' })
  const tooLarge = await call(sandbox, 'POST', CANCEL, { body: { pad: 'x'.repeat(1024 * 1024 + 10) } })
  t.equal(tooLarge.status, 413)
  t.match(tooLarge.body, { status: 413, success: false })
})

t.test('control routes', async (t) => {
  t.test('are off by default', async (t) => {
    const sandbox = await startSandbox(t)
    t.equal((await call(sandbox, 'POST', '/__sandbox/reset', { body: {} })).status, 404)
    t.equal((await call(sandbox, 'POST', '/__sandbox/failure', { body: { kind: 'garbage' } })).status, 404)
    t.equal((await list(sandbox, `user_email=${ALICE.email}`)).status, 200)
  })

  t.test('set and clear failures, and reset, when enabled', async (t) => {
    const sandbox = await startSandbox(t, { controlRoutes: true })
    const set = await call(sandbox, 'POST', '/__sandbox/failure', { body: { kind: 'status', status: 502, endpoint: 'list' }, key: null })
    t.strictSame(set.body, { status: 200, success: true, message: 'Failure set' })
    t.equal((await list(sandbox, '')).status, 502)
    invalid(t, await call(sandbox, 'POST', '/__sandbox/failure', { body: { kind: 'status' } }), 'not a sandbox failure mode')
    invalid(t, await call(sandbox, 'POST', '/__sandbox/failure', { body: { kind: 'slow', delayMs: -1 } }), 'not a sandbox failure mode')
    t.equal((await call(sandbox, 'POST', '/__sandbox/failure', { body: { kind: 'none' } })).body.message, 'Failure cleared')
    t.equal((await list(sandbox, '')).status, 400)
    await cancel(sandbox, { email: ALICE.email, appointmentId: ALICE.appointments[0]!.id })
    t.equal((await call(sandbox, 'POST', '/__sandbox/reset')).body.message, 'Sandbox reset')
    t.notOk(sandbox.control.isCancelled(ALICE.appointments[0]!.id))
    t.equal(sandbox.control.calls.length, 0, 'control calls are not recorded')
  })
})

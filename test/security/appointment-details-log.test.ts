import t from 'tap'
import { Writable } from 'node:stream'
import { buildTestApp, signIn } from '../helpers/app.js'
import { SANDBOX_KEY, startSandbox } from '../helpers/sandbox.js'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'

/**
 * The contract, "What never happens": no "other appointment details in a log line" (the audit
 * record carries the appointment id, the outcome and the request id). The suite's log scans look
 * for keys, tokens, cookies, emails and reasons; nothing looked for an appointment's title, topic,
 * practitioner, description or times, which the list answers carry and an upstream's error
 * message may quote.
 */

const alice = DEMO_PATIENTS[0]!
const bob = DEMO_PATIENTS[1]!

t.test('no log line, at debug level, carries an appointment\'s title, topic, practitioner, description or times', async (t) => {
  const sandbox = await startSandbox(t)
  const lines: string[] = []
  const logStream = new Writable({ write (chunk, _encoding, done) { lines.push(chunk.toString()); done() } })
  const { app, issuer } = await buildTestApp(t, {
    upstreamUrl: sandbox.url,
    logStream,
    env: { CV_API_KEY: SANDBOX_KEY, LOG_LEVEL: 'debug', CV_TIMEOUT_MS: '1000', RATE_LIMIT_CANCEL: '100/1m' }
  })
  const token = await signIn(app, issuer, alice.email)
  const headers = { authorization: `Bearer ${token}` }
  const list = await app.inject({ url: '/appointments', headers })
  t.equal(list.statusCode, 200)
  const listed = list.json().data as Array<Record<string, string | null>>
  const first = alice.appointments[0]!
  const details = new Set<string>()
  for (const item of listed) for (const field of ['title', 'topic', 'agentName', 'start', 'end']) if (typeof item[field] === 'string') details.add(item[field])
  for (const patient of [alice, bob]) for (const item of patient.appointments) for (const text of [item.title, item.topic, item.agentName]) details.add(text)
  details.add('Appointment description')
  t.ok(details.size > 10, `${details.size} details looked for`)

  // An upstream whose answers quote the appointment: its 400 (passed to the patient, never logged),
  // a 500 and a 200 with such a message, and a list with a description and odd items.
  const quoting = `Cannot cancel "${first.title}" (${first.topic}) with ${first.agentName}`
  sandbox.control.setFailure({ kind: 'status', status: 400, endpoint: 'cancel', times: 1, body: { status: 400, success: false, message: quoting, error: quoting } })
  const rejected = await app.inject({ method: 'POST', url: `/appointments/${first.id}/cancel`, headers, payload: { reason: 'a' } })
  t.equal(rejected.statusCode, 400)
  t.match(rejected.json().message, first.title, 'the patient gets the upstream\'s message')
  sandbox.control.setFailure({ kind: 'status', status: 500, endpoint: 'cancel', times: 1, body: { status: 500, success: false, message: quoting, error: quoting } })
  t.equal((await app.inject({ method: 'POST', url: `/appointments/${first.id}/cancel`, headers, payload: { reason: 'b' } })).statusCode, 502)
  sandbox.control.setFailure({ kind: 'status', status: 200, endpoint: 'cancel', times: 1, body: { status: 200, success: true, message: `Cancelled "${first.title}" with ${first.agentName}` } })
  t.equal((await app.inject({ method: 'POST', url: `/appointments/${first.id}/cancel`, headers })).statusCode, 200)
  sandbox.control.setFailure({ kind: 'status', status: 200, endpoint: 'list', times: 1, body: { status: 200, success: true, message: quoting, data: [{ id: first.id, title: first.title, topic: first.topic, agentName: first.agentName, description: 'Appointment description', start: 42, end: { at: first.title } }, 'odd', null] } })
  t.equal((await app.inject({ url: '/appointments', headers })).statusCode, 200)
  sandbox.control.setFailure({ kind: 'status', status: 200, endpoint: 'list', times: 1, body: { status: 200, success: false, message: quoting } })
  t.equal((await app.inject({ url: '/appointments', headers })).statusCode, 502)
  // Someone else's appointment, and a normal cancel.
  t.equal((await app.inject({ method: 'POST', url: `/appointments/${bob.appointments[0]!.id}/cancel`, headers })).statusCode, 404)
  t.equal((await app.inject({ method: 'POST', url: `/appointments/${alice.appointments[1]!.id}/cancel`, headers })).statusCode, 200)

  t.ok(lines.length > 10, `${lines.length} log lines`)
  const found: string[] = []
  for (const line of lines) {
    for (const detail of details) {
      if (line.includes(detail) || line.includes(JSON.stringify(detail).slice(1, -1))) found.push(`${JSON.stringify(detail)} in ${line.slice(0, 160)}`)
    }
  }
  t.same(found.slice(0, 5), [], 'no appointment detail in any log line')
  t.ok(lines.some((line) => line.includes(`"appointmentId":"${alice.appointments[1]!.id}"`)), 'the audit record names the appointment by its id, as allowed')
})

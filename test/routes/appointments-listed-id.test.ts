import t, { type Test } from 'tap'
import { buildTestApp, signIn } from '../helpers/app.js'
import { SANDBOX_KEY, startSandbox } from '../helpers/sandbox.js'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'
import type { SandboxOptions } from '../../src/care360/sandbox.js'

/**
 * The appointment a cancel's audit record names, and how a lost answer is resolved, when the
 * upstream lists the appointment in a way the other tests' sandbox never does: its id in upper
 * case (the record names it in lower case, as a trail counts one name per appointment), or
 * without a readable end (nothing then says it ended, so its absence from a fresh list confirms).
 */

const aliceFirst = DEMO_PATIENTS[0]!.appointments[0]!

interface Audit { appointmentId: string | null, outcome: string, status: number, earlier: string | null }

async function stack (t: Test, sandboxOptions: Partial<SandboxOptions> = {}) {
  const sandbox = await startSandbox(t, sandboxOptions)
  const logs: string[] = []
  const { app, issuer } = await buildTestApp(t, {
    upstreamUrl: sandbox.url,
    logStream: { write (line: string) { logs.push(line) } },
    env: { CV_API_KEY: SANDBOX_KEY, CV_TIMEOUT_MS: '1000', RATE_LIMIT_CANCEL: '1000/1m', RATE_LIMIT_SESSION: '1000/1m' }
  })
  const audits = (): Audit[] => logs.map((line) => JSON.parse(line) as { audit?: Audit }).flatMap((entry) => entry.audit === undefined ? [] : [entry.audit])
  return { app, sandbox, issuer, audits }
}

t.test('an appointment the upstream lists in upper case is audited under its id in lower case', async (t) => {
  const listed = aliceFirst.id.toUpperCase()
  const eventId = 'b7e2c9a4-1d3f-4e5a-8b6c-0f9e8d7c6b5a'
  const carol = { email: 'carol@example.com', name: 'Carol Patient', appointments: [{ ...aliceFirst, id: listed, agentEventId: eventId }] }
  const { app, sandbox, issuer, audits } = await stack(t, { seed: [carol] })
  const token = await signIn(app, issuer, carol.email)
  // Asked by its agentEventId: the record names it by its listed id all the same.
  const answer = await app.inject({ method: 'POST', url: `/appointments/${eventId}/cancel`, headers: { authorization: `Bearer ${token}` } })
  t.equal(answer.statusCode, 200)
  t.ok(sandbox.control.isCancelled(listed))
  t.match(audits(), [{ appointmentId: aliceFirst.id.toLowerCase(), outcome: 'cancelled', status: 200, earlier: null }])
})

t.test('a lost answer for an appointment listed without a readable end: absent from a fresh list, it is confirmed', async (t) => {
  const { app, sandbox, issuer, audits } = await stack(t)
  const token = await signIn(app, issuer, DEMO_PATIENTS[0]!.email)
  const headers = { authorization: `Bearer ${token}`, 'idempotency-key': 'undated-lost' }
  const undated = '6A1E0F3C-2B4D-4E8F-9A7B-5C3D2E1F0A9B'
  // The patient's list, as the ownership check will read it from its cache: the appointment, its end unreadable.
  sandbox.control.setFailure({ kind: 'status', status: 200, endpoint: 'list', body: { status: 200, success: true, data: [{ id: undated, end: 'soon' }] }, times: 1 })
  t.equal((await app.inject({ url: '/appointments', headers })).statusCode, 200)
  // Its cancel is sent and its answer lost: the outcome is unknown, the record knows no end.
  sandbox.control.setFailure({ kind: 'reset', endpoint: 'cancel', times: 1 })
  t.equal((await app.inject({ method: 'POST', url: `/appointments/${undated.toLowerCase()}/cancel`, headers })).statusCode, 502)
  // The retry's fresh list (the sandbox's own) no longer has it, and nothing says it has ended.
  const retry = await app.inject({ method: 'POST', url: `/appointments/${undated.toLowerCase()}/cancel`, headers })
  t.equal(retry.statusCode, 200, 'confirmed')
  t.match(retry.json().message, /confirmed/)
  t.equal(sandbox.control.calls.filter((call) => call.method === 'POST').length, 1, 'the cancel is not sent again')
  t.match(audits().at(-1), { appointmentId: undated.toLowerCase(), outcome: 'cancelled', status: 200, earlier: 'confirmed' })
})

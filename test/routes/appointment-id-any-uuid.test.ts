import t from 'tap'
import { buildTestApp, signIn } from '../helpers/app.js'
import { SANDBOX_KEY, startSandbox } from '../helpers/sandbox.js'

/**
 * The contract, cancel step 4: `:id` must be a UUID, "any version, either case". The suite's ids
 * were all RFC 9562 version 1 to 8 with its variant (the demo seed's, fast-check's uuid()): a
 * pattern that required those would have passed it, and refused the upstream's own ids of other
 * shapes (a version 0 or a non-RFC variant: the vendor documents "UUID-shaped", nothing more).
 */

const ODD_IDS = [
  '00000000-0000-0000-0000-000000000000', // nil
  'ffffffff-ffff-ffff-ffff-ffffffffffff', // max (RFC 9562, 5.10)
  '12345678-1234-0234-1234-123456789abc', // version 0, variant 0 (NCS)
  'abcdef01-2345-f678-c9ab-cdef01234567', // version 15, variant c (Microsoft)
  '01890a5d-ac96-774b-bcce-b302099a8057', // version 7
  '1ec9414c-232a-6b00-b3c8-9e6bdeced846' // version 6
]

t.test('a UUID of any version and variant, in either case, names an appointment: cancelled, sent as the upstream lists it', async (t) => {
  const email = 'odd-ids@example.com'
  const sandbox = await startSandbox(t, {
    seed: [{
      email,
      name: 'Odd Ids',
      appointments: ODD_IDS.map((id, index) => ({
        id,
        agentEventId: `aaaaaaaa-bbbb-0ccc-dddd-${String(index).padStart(12, '0')}`,
        title: `Visit ${index}`,
        topic: 'Check-up',
        agentName: 'Dr. Who',
        startsInMinutes: 60 * 24 * (index + 1),
        durationMinutes: 30
      }))
    }]
  })
  const { app, issuer } = await buildTestApp(t, {
    upstreamUrl: sandbox.url,
    env: { CV_API_KEY: SANDBOX_KEY, RATE_LIMIT_CANCEL: '100/1m' }
  })
  const token = await signIn(app, issuer, email)
  const cancel = async (id: string) => await app.inject({ method: 'POST', url: `/appointments/${id}/cancel`, headers: { authorization: `Bearer ${token}` } })
  const spellings = (id: string, index: number): string => index % 3 === 0 ? id : index % 3 === 1 ? id.toUpperCase() : id.replace(/[a-f]/g, (c, at: number) => at % 2 === 0 ? c.toUpperCase() : c)
  for (const [index, id] of ODD_IDS.entries()) {
    const asked = spellings(id, index)
    const answer = await cancel(asked)
    t.equal(answer.statusCode, 200, `${asked}: ${answer.body.slice(0, 120)}`)
    t.same(sandbox.control.calls.filter((call) => call.method === 'POST').at(-1)?.body, { email, appointmentId: id }, `${asked} forwarded as listed`)
  }
  // By the agentEventId, a version 0 UUID too.
  await t.test('by its agentEventId (version 0)', async (t) => {
    const fresh = await startSandbox(t, {
      seed: [{ email, name: 'Odd Ids', appointments: [{ id: '3f0b5d2e-8a41-4c1e-9f27-1a6d3c8e5b99', agentEventId: 'aaaaaaaa-bbbb-0ccc-dddd-eeeeeeeeeeee', title: 'x', topic: 'y', agentName: 'z', startsInMinutes: 600, durationMinutes: 30 }] }]
    })
    const { app: other, issuer: otherIssuer } = await buildTestApp(t, { upstreamUrl: fresh.url, env: { CV_API_KEY: SANDBOX_KEY } })
    const otherToken = await signIn(other, otherIssuer, email)
    const answer = await other.inject({ method: 'POST', url: '/appointments/AAAAAAAA-BBBB-0CCC-DDDD-EEEEEEEEEEEE/cancel', headers: { authorization: `Bearer ${otherToken}` } })
    t.equal(answer.statusCode, 200)
    t.same(fresh.control.calls.filter((call) => call.method === 'POST').at(-1)?.body, { email, appointmentId: 'aaaaaaaa-bbbb-0ccc-dddd-eeeeeeeeeeee' })
  })
})

t.test('OWNERSHIP_CHECK=off: a UUID of any version goes upstream in lower case; one not of UUID shape is still a 400', async (t) => {
  const sandbox = await startSandbox(t)
  const { app, issuer } = await buildTestApp(t, {
    upstreamUrl: sandbox.url,
    env: { CV_API_KEY: SANDBOX_KEY, OWNERSHIP_CHECK: 'off', RATE_LIMIT_CANCEL: '100/1m' }
  })
  const token = await signIn(app, issuer, 'alice@example.com')
  const cancel = async (id: string) => await app.inject({ method: 'POST', url: `/appointments/${id}/cancel`, headers: { authorization: `Bearer ${token}` } })
  for (const id of ODD_IDS) {
    const answer = await cancel(id.toUpperCase())
    // The sandbox knows none of them: its own refusal, which shows the cancel was sent.
    t.not(answer.json().code, 'VALIDATION_FAILED', `${id} passes validation`)
    t.equal((sandbox.control.calls.at(-1)?.body as { appointmentId?: string } | undefined)?.appointmentId, id, `${id} sent in lower case`)
  }
  const sent = sandbox.control.calls.length
  for (const bad of ['00000000-0000-0000-0000-00000000000', '00000000-0000-0000-0000-0000000000000', 'gggggggg-0000-0000-0000-000000000000', '00000000000000000000000000000000', '{00000000-0000-0000-0000-000000000000}']) {
    const answer = await cancel(encodeURIComponent(bad))
    t.equal(answer.statusCode, 400, bad)
    t.equal(answer.json().code, 'VALIDATION_FAILED', bad)
  }
  t.equal(sandbox.control.calls.length, sent, 'none of those was sent')
})

import t from 'tap'
import { mobileIdToken } from '../../demo/id-token.js'
import { startDemo } from '../../demo/stack.js'

/**
 * The walkthrough's mobile path, step by step, against the demo stack on free ports: an ID token
 * from the development IdP for the mobile client, exchanged for a session, then list and cancel
 * with the bearer token, as the printed curl commands do.
 */

t.test('mobile walkthrough: ID token, session, list, cancel, sign out', async (t) => {
  const demo = await startDemo({ ports: { service: 0, idp: 0, sandbox: 0, page: 0 }, logLevel: 'silent' })
  t.teardown(() => demo.close())
  const { service } = demo.urls

  const idToken = await mobileIdToken({ issuer: demo.urls.idp, email: 'bob@example.com' })
  const claims = JSON.parse(Buffer.from(idToken.split('.')[1] as string, 'base64url').toString()) as Record<string, unknown>
  t.match(claims, { iss: demo.urls.idp, aud: demo.mobileClientId, email: 'bob@example.com', email_verified: true }, 'a real ID token for the mobile client')

  const session = await fetch(`${service}/auth/session`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ idToken }) })
  t.equal(session.status, 201)
  const { data } = await session.json() as { data: { token: string, email: string } }
  t.equal(data.email, 'bob@example.com')
  const bearer = { authorization: `Bearer ${data.token}` }

  const list = await fetch(`${service}/appointments`, { headers: bearer })
  t.equal(list.status, 200)
  const appointments = (await list.json() as { data: Array<{ id: string }> }).data
  const bob = demo.patients.find((patient) => patient.email === 'bob@example.com')
  t.same(appointments.map((item) => item.id), bob?.appointments.map((item) => item.id))

  const target = appointments[0]?.id as string
  const cancel = () => fetch(`${service}/appointments/${target}/cancel`, {
    method: 'POST',
    headers: { ...bearer, 'content-type': 'application/json', 'idempotency-key': 'demo-cancel-1' },
    body: JSON.stringify({ reason: 'Feeling better' })
  })
  const first = await cancel()
  t.equal(first.status, 200)
  t.match(await first.json(), { success: true, message: 'Meeting cancelled successfully' })
  const replay = await cancel()
  t.equal(replay.status, 200, 'the same key replays the answer')
  t.equal(demo.sandbox.calls.filter((call) => call.method === 'POST').length, 1, 'one cancel reached Care360')

  // Another patient's appointment is not found, and never sent.
  const alicesId = demo.patients.find((patient) => patient.email === 'alice@example.com')?.appointments[0]?.id as string
  const foreign = await fetch(`${service}/appointments/${alicesId}/cancel`, { method: 'POST', headers: bearer })
  t.equal(foreign.status, 404)
  t.match(await foreign.json(), { code: 'APPOINTMENT_NOT_FOUND' })

  const logout = await fetch(`${service}/auth/logout`, { method: 'POST', headers: bearer })
  t.equal(logout.status, 200)
  const after = await fetch(`${service}/appointments`, { headers: bearer })
  t.equal(after.status, 401)
})

t.test('demo:id-token refuses an unknown account', async (t) => {
  const demo = await startDemo({ ports: { service: 0, idp: 0, sandbox: 0, page: 0 }, logLevel: 'silent' })
  t.teardown(() => demo.close())
  await t.rejects(mobileIdToken({ issuer: demo.urls.idp, email: 'mallory@example.com' }), /not a demo account/)
})

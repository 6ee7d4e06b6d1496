import t from 'tap'
import { buildTestApp, signIn } from '../helpers/app.js'
import { SANDBOX_KEY, startSandbox } from '../helpers/sandbox.js'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'

/**
 * The contract: the list is upstream "Fetch Appointments" filtered by the session's email, and
 * "the email always comes from the session, never from the client". The suite showed it for the
 * cancel's body; nothing tried a client naming another patient to the list.
 */

const alice = DEMO_PATIENTS[0]!
const bob = DEMO_PATIENTS[1]!

t.test('GET /appointments asks the upstream for the session\'s email only, whatever the client adds', async (t) => {
  const sandbox = await startSandbox(t)
  const { app, issuer } = await buildTestApp(t, { upstreamUrl: sandbox.url, env: { CV_API_KEY: SANDBOX_KEY } })
  const token = await signIn(app, issuer, alice.email)
  const attempts = [
    `/appointments?user_email=${encodeURIComponent(bob.email)}`,
    `/appointments?email=${encodeURIComponent(bob.email)}&user_email=${encodeURIComponent(bob.email)}`,
    '/appointments?start_date=2000-01-01&end_date=2999-12-31'
  ]
  for (const url of attempts) {
    const answer = await app.inject({ url, headers: { authorization: `Bearer ${token}`, 'x-user-email': bob.email, cookie: `user_email=${bob.email}` } })
    t.equal(answer.statusCode, 200, url)
    t.same(answer.json().data.map((item: { id: string }) => item.id), alice.appointments.map((item) => item.id), `${url}: Alice's own list`)
    const asked = sandbox.control.calls.at(-1)!
    t.equal(asked.method, 'GET')
    t.same(asked.query, { user_email: alice.email }, `${url}: the upstream was asked for the session's email, and nothing else`)
    t.equal(asked.headers['x-user-email'], undefined, 'no client header goes along')
    t.equal(asked.headers.cookie, undefined, 'no cookie goes along')
    t.notMatch(answer.body, bob.appointments[0]!.id)
  }
})

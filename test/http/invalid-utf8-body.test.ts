import t from 'tap'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'
import { startSandboxedApp } from '../fault/support.js'

const alice = DEMO_PATIENTS[0]!

/**
 * JSON is UTF-8 (RFC 8259, 8.1) and the README promises a body in another charset is refused
 * (415) "rather than read wrongly". A body whose bytes are not UTF-8 (a Latin-1 client that sends
 * no charset, the common case) is read wrongly today: each invalid byte becomes U+FFFD, and the
 * altered reason is sent to Care360 and the appointment cancelled.
 */
t.test('a JSON body that is not valid UTF-8 is refused, never altered and forwarded', async (t) => {
  const { app, sandbox, auth } = await startSandboxedApp(t, { upstreamTimeoutMs: 2000, email: alice.email })
  const id = alice.appointments[0]!.id
  const latin1 = Buffer.from('{"reason":"caf\xe9 r\xe9sum\xe9"}', 'latin1')
  const res = await app.inject({
    method: 'POST',
    url: `/appointments/${id}/cancel`,
    headers: { ...auth, 'content-type': 'application/json' },
    payload: latin1
  })
  t.not(res.statusCode, 200, 'not cancelled')
  t.ok([400, 415].includes(res.statusCode), `a 400 or 415 (got ${res.statusCode})`)
  t.ok(['VALIDATION_FAILED', 'UNSUPPORTED_MEDIA_TYPE'].includes((res.json() as { code?: string }).code ?? ''), 'in the envelope with a body code')
  const sent = sandbox.control.calls.filter((call) => call.method === 'POST').map((call) => call.body)
  t.same(sent, [], `no cancel reaches the upstream (sent: ${JSON.stringify(sent)})`)
  t.notOk(sandbox.control.isCancelled(id), 'the appointment is not cancelled')
})

import t from 'tap'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'
import { startSandboxedApp } from '../fault/support.js'

const alice = DEMO_PATIENTS[0]!

/**
 * One BOM before the JSON is dropped (RFC 8259 8.1 allows ignoring it); a second one is not JSON,
 * and was 400 before the body was read as bytes. The fatal TextDecoder drops one BOM and
 * secure-json-parse drops the next: two BOMs are read as JSON and the cancel goes upstream.
 */
t.test('a body with two BOMs is not JSON; one BOM is fine', async (t) => {
  const { app, sandbox, auth } = await startSandboxedApp(t, { upstreamTimeoutMs: 2000, email: alice.email })
  const id = alice.appointments[0]!.id
  const twoBoms = Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf, 0xef, 0xbb, 0xbf]), Buffer.from('{"reason":"Feeling better"}')])
  const res = await app.inject({ method: 'POST', url: `/appointments/${id}/cancel`, headers: { ...auth, 'content-type': 'application/json' }, payload: twoBoms })
  t.equal(res.statusCode, 400, `two BOMs: 400 (got ${res.statusCode})`)
  t.equal(sandbox.control.calls.filter((call) => call.method === 'POST').length, 0, 'no cancel reaches the upstream')
  const oneBom = Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from('{"reason":"Feeling better"}')])
  const ok = await app.inject({ method: 'POST', url: `/appointments/${id}/cancel`, headers: { ...auth, 'content-type': 'application/json' }, payload: oneBom })
  t.equal(ok.statusCode, 200, 'one BOM: cancelled')
})

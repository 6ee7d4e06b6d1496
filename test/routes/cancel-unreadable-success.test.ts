import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import t, { type Test } from 'tap'
import { buildTestApp, signIn, TEST_API_KEY } from '../helpers/app.js'
import { listenOnLoopback } from '../helpers/ports.js'

/**
 * An upstream that applies a cancel and answers it 200, but with a body that is not the documented
 * success (not JSON, over the cap, `success` not true). The patient is told 502 UPSTREAM_ERROR (the
 * contract's row for such a body); but the upstream took the cancel, so it may well have happened,
 * as for an answer cut off mid-body: a retry with the same Idempotency-Key must ask the upstream
 * (a fresh list) rather than replay that 502 for 24 h, and confirm the cancel it finds done.
 */

const EMAIL = 'dana@example.com'
const FUTURE = new Date(Date.now() + 7 * 24 * 3600_000).toISOString()

/** The 200 bodies of the cancel, by name. */
const UNREADABLE: Record<string, string> = {
  'not JSON': 'Meeting cancelled successfully',
  'over the cap': JSON.stringify({ status: 200, success: true, message: 'x'.repeat(70 * 1024) }),
  'success not true': JSON.stringify({ status: 200, success: 'true', message: 'Meeting cancelled successfully' })
}

interface Upstream { url: string, cancels: () => number, use: (body: string) => void }

/** Lists the patient's appointments not yet cancelled; a cancel applies, then answers 200 with `body`. */
async function startUpstream (t: Test, ids: readonly string[]): Promise<Upstream> {
  const cancelled = new Set<string>()
  let cancels = 0
  let body = ''
  const server = createServer(function serve (request: IncomingMessage, response: ServerResponse) {
    const chunks: Buffer[] = []
    request.on('data', (chunk: Buffer) => chunks.push(chunk))
    request.on('end', () => {
      if (request.method === 'POST') {
        cancels++
        cancelled.add((JSON.parse(Buffer.concat(chunks).toString()) as { appointmentId: string }).appointmentId)
        response.writeHead(200, { 'content-type': 'application/json' })
        response.end(body)
        return
      }
      const data = ids.filter((id) => !cancelled.has(id)).map((id) => ({ id, end: FUTURE }))
      response.writeHead(200, { 'content-type': 'application/json' })
      response.end(JSON.stringify({ status: 200, success: true, message: 'Appointments fetched successfully', data }))
    })
  })
  const port = await listenOnLoopback(t, server)
  return { url: `http://127.0.0.1:${port}`, cancels: () => cancels, use: (next) => { body = next } }
}

for (const [name, body] of Object.entries(UNREADABLE)) {
  t.test(`a cancel answered 200 with a body ${name}: its key's retry confirms it, not a replayed 502`, async (t) => {
    const id = '5d7a3c1e-9b2f-4e6a-8c4d-2f1e0a9b8c7d'
    const upstream = await startUpstream(t, [id])
    upstream.use(body)
    const { app, issuer } = await buildTestApp(t, {
      upstreamUrl: upstream.url,
      env: { CV_API_KEY: TEST_API_KEY, CV_TIMEOUT_MS: '2000' }
    })
    const token = await signIn(app, issuer, EMAIL)
    const headers = { authorization: `Bearer ${token}`, 'idempotency-key': `unreadable-${name.replace(/ /g, '-')}` }
    const first = await app.inject({ method: 'POST', url: `/appointments/${id}/cancel`, headers })
    t.equal(first.statusCode, 502, `the body is not the documented success: 502 (${first.body})`)
    t.equal(first.json().code, 'UPSTREAM_ERROR')
    t.equal(upstream.cancels(), 1, 'the cancel reached the upstream, which applied it')

    const retry = await app.inject({ method: 'POST', url: `/appointments/${id}/cancel`, headers })
    t.not(retry.headers['idempotent-replayed'], 'true', 'the 502 is not replayed')
    t.equal(retry.statusCode, 200, 'the retry finds the appointment gone from a fresh list: confirmed')
    t.match(retry.json().message, /confirmed/)
    t.equal(upstream.cancels(), 1, 'and sends no second cancel')
  })
}

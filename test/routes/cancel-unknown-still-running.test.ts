import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import t, { type Test } from 'tap'
import { buildTestApp, signIn, TEST_API_KEY } from '../helpers/app.js'
import { answerJson, listenOnLoopback } from '../helpers/ports.js'

/**
 * A keyed cancel whose upstream call outlives the deadline (504, outcome unknown) while the
 * upstream is still working on it. The patient's retry with the same key comes at once: a fresh
 * list still shows the appointment (the first cancel is not applied yet), so the cancel is sent
 * again, and the upstream, which applies one cancel of an appointment at a time, refuses that one
 * as already cancelled once the first is done. The first request did cancel: the key must not
 * keep "rejected" for 24 h. A refusal of a cancel sent to resolve an unknown outcome is checked
 * against a fresh list once more, and the appointment gone from it is the cancel confirmed.
 */

const EMAIL = 'erin@example.com'
const ID = '8b3f1d2e-6c4a-4f7e-9a1b-3d5c7e9f0a2b'
const FUTURE = new Date(Date.now() + 7 * 24 * 3600_000).toISOString()
const TIMEOUT_MS = 1000
/** The first cancel is applied this long after its arrival: after the service gave up on it. */
const FIRST_APPLIED_AFTER_MS = TIMEOUT_MS + 400

interface Upstream { url: string, cancels: () => number }

async function startUpstream (t: Test): Promise<Upstream> {
  let cancelled = false
  let cancels = 0
  // The cancel being applied, which a second one for the same appointment waits for.
  let applying: Promise<void> | null = null
  const server = createServer(function serve (request: IncomingMessage, response: ServerResponse) {
    request.resume()
    request.on('end', () => {
      const json = (status: number, body: object): void => { answerJson(response, status, body) }
      if (request.method === 'GET') {
        json(200, { status: 200, success: true, message: 'Appointments fetched successfully', data: cancelled ? [] : [{ id: ID, end: FUTURE }] })
        return
      }
      cancels++
      if (applying === null && !cancelled) {
        applying = new Promise((resolve) => setTimeout(() => { cancelled = true; resolve() }, FIRST_APPLIED_AFTER_MS))
        applying.then(() => { json(200, { status: 200, success: true, message: 'Meeting cancelled successfully' }) }, () => {})
        return
      }
      Promise.resolve(applying).then(() => {
        json(400, { status: 400, success: false, message: 'Invalid request', error: 'Appointment is already cancelled' })
      }, () => {})
    })
  })
  const port = await listenOnLoopback(t, server)
  return { url: `http://127.0.0.1:${port}`, cancels: () => cancels }
}

t.test('a keyed retry that resends a cancel the upstream was still applying confirms it, not "already cancelled"', async (t) => {
  const upstream = await startUpstream(t)
  const { app, issuer } = await buildTestApp(t, {
    upstreamUrl: upstream.url,
    env: { CV_API_KEY: TEST_API_KEY, CV_TIMEOUT_MS: String(TIMEOUT_MS) }
  })
  const token = await signIn(app, issuer, EMAIL)
  const headers = { authorization: `Bearer ${token}`, 'idempotency-key': 'still-running-1' }
  const url = `/appointments/${ID}/cancel`

  const first = await app.inject({ method: 'POST', url, headers })
  t.equal(first.statusCode, 504, 'the first call outlives the deadline')
  t.equal(upstream.cancels(), 1)

  const retry = await app.inject({ method: 'POST', url, headers })
  t.equal(upstream.cancels(), 2, 'the retry found it still listed and sent the cancel again')
  t.equal(retry.statusCode, 200, `the appointment is cancelled: confirmed (${retry.body})`)
  t.match(retry.json().message, /confirmed/)

  const again = await app.inject({ method: 'POST', url, headers })
  t.equal(again.statusCode, 200, 'and replayed so')
  t.equal(again.headers['idempotent-replayed'], 'true')
  t.equal(upstream.cancels(), 2)
})

import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import t, { type Test } from 'tap'
import { buildTestApp, signIn, TEST_API_KEY } from '../helpers/app.js'
import { answerJson, listenOnLoopback } from '../helpers/ports.js'

/**
 * A keyed cancel whose upstream call outlives the deadline (504, outcome unknown), and that the
 * upstream never applied. The patient's retry finds the appointment still listed and sends the
 * cancel again; while that one is on its way the appointment ends, and the upstream refuses it (it
 * is no longer upcoming). A fresh list no longer shows the appointment, but because it ended, not
 * because it was cancelled: the retry must not answer "cancelled (confirmed)" for an appointment
 * that took place, nor keep that answer for the key's 24 h.
 */

const EMAIL = 'frank@example.com'
const ID = '2c9e4b7a-1d3f-4a6e-8b5c-7f0a9d2e4c61'
const TIMEOUT_MS = 3000
/**
 * The appointment ends this long after the first cancel is sent: after the retry's send (the first
 * takes TIMEOUT_MS), with its refusal (100 ms after the end) still within the retry's deadline. The
 * retry may come up to 2.6 s late (a loaded machine) and still be sent while the appointment is
 * listed; it cannot come early, since the first call waits its whole deadline.
 */
const ENDS_AFTER_MS = TIMEOUT_MS + 2700

interface Upstream { url: string, cancels: () => number, start: () => void }

async function startUpstream (t: Test): Promise<Upstream> {
  let cancels = 0
  let end = Number.POSITIVE_INFINITY
  const server = createServer(function serve (request: IncomingMessage, response: ServerResponse) {
    request.resume()
    request.on('end', () => {
      const json = (status: number, body: object): void => { answerJson(response, status, body) }
      if (request.method === 'GET') {
        // Upcoming appointments only: one that has ended is no longer listed.
        const data = Date.now() < end ? [{ id: ID, end: new Date(end).toISOString() }] : []
        json(200, { status: 200, success: true, message: 'Appointments fetched successfully', data })
        return
      }
      cancels++
      // The first cancel is never answered (nor applied): the service gives up on it.
      if (cancels === 1) return
      // The retry's is refused once the appointment has ended.
      setTimeout(() => {
        json(400, { status: 400, success: false, message: 'Invalid request', error: 'Appointment is no longer upcoming' })
      }, Math.max(0, end - Date.now()) + 100)
    })
  })
  const port = await listenOnLoopback(t, server)
  return {
    url: `http://127.0.0.1:${port}`,
    cancels: () => cancels,
    start: () => { end = Date.now() + ENDS_AFTER_MS }
  }
}

t.test('a keyed retry whose resent cancel is refused because the appointment ended meanwhile is not confirmed', async (t) => {
  const upstream = await startUpstream(t)
  const { app, issuer } = await buildTestApp(t, {
    upstreamUrl: upstream.url,
    env: { CV_API_KEY: TEST_API_KEY, CV_TIMEOUT_MS: String(TIMEOUT_MS) }
  })
  const token = await signIn(app, issuer, EMAIL)
  const headers = { authorization: `Bearer ${token}`, 'idempotency-key': 'ended-meanwhile-1' }
  const url = `/appointments/${ID}/cancel`

  upstream.start()
  const first = await app.inject({ method: 'POST', url, headers })
  t.equal(first.statusCode, 504, 'the first call outlives the deadline')
  t.equal(upstream.cancels(), 1)

  const retry = await app.inject({ method: 'POST', url, headers })
  t.equal(upstream.cancels(), 2, 'the retry found it still listed and sent the cancel again')
  t.not(retry.statusCode, 200, `an appointment that ended, not cancelled, is not confirmed cancelled (${retry.body})`)
  t.equal(retry.json().code, 'UPSTREAM_REJECTED', 'the upstream\'s refusal is the answer')

  const again = await app.inject({ method: 'POST', url, headers })
  t.equal(again.statusCode, retry.statusCode, 'and that is what the key keeps')
  t.not(again.statusCode, 200)
})

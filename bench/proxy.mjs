// The minimal hand-written proxy the service is compared with: node:http in front of an undici
// Pool, forwarding POST /appointments/:id/cancel as the upstream cancel with the organization
// key and the same body ({ email, appointmentId, reason }). No sessions, limits, validation,
// ownership, logging or idempotency: the floor of what any forwarder in Node costs.
// Environment: PORT, UPSTREAM_URL, CV_API_KEY, PATIENT_EMAIL. Prints {"port":N} once listening.
import { createServer } from 'node:http'
import { Pool } from 'undici'

const CANCEL_PATH = '/api/v1/calendar/appointments/cancel'
const route = /^\/appointments\/([0-9a-fA-F-]{36})\/cancel$/
const key = process.env.CV_API_KEY ?? ''
const email = process.env.PATIENT_EMAIL ?? 'patient@example.com'
// The same pool shape as the service's Care360 client: 10 keep-alive sockets, no pipelining.
const pool = new Pool(process.env.UPSTREAM_URL, { connections: 10, pipelining: 1 })

function send (response, status, body) {
  response.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) })
  response.end(body)
}

async function forward (appointmentId, text, response) {
  let reason
  try { reason = text === '' ? undefined : JSON.parse(text).reason } catch { return send(response, 400, '{"status":400,"success":false}') }
  try {
    const answer = await pool.request({
      method: 'POST',
      path: CANCEL_PATH,
      headers: { 'cv-api-key': key, 'content-type': 'application/json' },
      body: JSON.stringify(reason === undefined ? { email, appointmentId } : { email, appointmentId, reason })
    })
    send(response, answer.statusCode, await answer.body.text())
  } catch {
    send(response, 502, '{"status":502,"success":false}')
  }
}

const server = createServer({ keepAliveTimeout: 65_000 }, function proxy (request, response) {
  const match = request.method === 'POST' ? route.exec(request.url) : null
  const chunks = []
  request.on('data', (chunk) => chunks.push(chunk))
  request.on('end', function forwardWhenRead () {
    if (match === null) return send(response, 404, '{"status":404,"success":false}')
    forward(match[1], Buffer.concat(chunks).toString('utf8'), response)
  })
})
server.listen(Number(process.env.PORT ?? 0), '127.0.0.1', function listening () {
  process.stdout.write(`${JSON.stringify({ port: server.address().port })}\n`)
})
process.on('SIGTERM', () => { server.closeAllConnections(); server.close(() => pool.close().then(() => process.exit(0))) })

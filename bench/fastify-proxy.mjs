// The reference point: a plain Fastify forwarder with request logging (Fastify's default
// "incoming request" and "request completed" lines, pino JSON at info to stdout) in front of the
// same undici Pool, forwarding POST /appointments/:id/cancel as the upstream cancel. No sessions,
// limits, validation, ownership or idempotency. Measured beside the minimal proxy so that what
// Fastify itself costs on this machine is known, and what the service adds on top of it.
// Environment: PORT, UPSTREAM_URL, CV_API_KEY, PATIENT_EMAIL. Prints {"port":N} once listening.
// The log lines go to /dev/null through the same asynchronous SonicBoom as the service's stdout.
import Fastify from 'fastify'
import pino from 'pino'
import { Pool } from 'undici'

const CANCEL_PATH = '/api/v1/calendar/appointments/cancel'
const key = process.env.CV_API_KEY ?? ''
const email = process.env.PATIENT_EMAIL ?? 'patient@example.com'
const pool = new Pool(process.env.UPSTREAM_URL, { connections: 10, pipelining: 1 })

const app = Fastify({ logger: { level: 'info', stream: pino.destination({ dest: '/dev/null', sync: false }) } })
app.post('/appointments/:id/cancel', async function forward (request, reply) {
  const reason = request.body?.reason
  const appointmentId = request.params.id
  const answer = await pool.request({
    method: 'POST',
    path: CANCEL_PATH,
    headers: { 'cv-api-key': key, 'content-type': 'application/json' },
    body: JSON.stringify(reason === undefined ? { email, appointmentId } : { email, appointmentId, reason })
  })
  const text = await answer.body.text()
  return reply.code(answer.statusCode).type('application/json').send(text)
})
await app.listen({ port: Number(process.env.PORT ?? 0), host: '127.0.0.1' })
process.stdout.write(`${JSON.stringify({ port: app.server.address().port })}\n`)
process.on('SIGTERM', () => { app.close().then(() => pool.close()).then(() => process.exit(0)) })

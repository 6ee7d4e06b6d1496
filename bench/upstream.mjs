// A fixed-answer imitation of the two Care360 endpoints, for benchmarks only: the cancel always
// answers 200 (so the same cancel can be sent again and again) and the list always contains the
// one appointment the benchmark cancels (so the ownership check always passes). It keeps no
// state per request, so it neither slows down nor grows during a long run.
// Environment: PORT (0 = any), CV_API_KEY, APPOINTMENT_ID. Prints {"port":N} once listening.
import { createServer } from 'node:http'

const CANCEL_PATH = '/api/v1/calendar/appointments/cancel'
const LIST_PATH = '/api/v1/calendar/appointments'
const key = process.env.CV_API_KEY ?? ''
const id = process.env.APPOINTMENT_ID ?? '3f0b5d2e-8a41-4c1e-9f27-1a6d3c8e5b01'
const start = new Date(Date.now() + 86_400_000 * 365).toISOString()
const end = new Date(Date.parse(start) + 1_800_000).toISOString()

const cancelBody = JSON.stringify({ status: 200, success: true, message: 'Meeting cancelled successfully' })
const listBody = JSON.stringify({
  status: 200,
  success: true,
  message: 'Appointments fetched successfully',
  data: [{
    id,
    agentEventId: 'a1c4e7f0-2b5d-4e8a-b1c4-7f0a2b5d8e01',
    title: 'Follow-up consultation',
    topic: 'Weight management',
    start,
    end,
    status: 'CONFIRMED',
    agentName: 'Dr. Grace Hopper'
  }]
})
const unauthorized = JSON.stringify({ status: 401, success: false, message: 'Unauthorized' })
const notFound = JSON.stringify({ status: 404, success: false, message: 'Not Found' })

function send (response, status, body) {
  response.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) })
  response.end(body)
}

const server = createServer({ keepAliveTimeout: 120_000 }, function answer (request, response) {
  request.resume()
  request.on('end', function answerWhenRead () {
    if (request.headers['cv-api-key'] !== key) return send(response, 401, unauthorized)
    const path = request.url.split('?')[0]
    if (request.method === 'POST' && path === CANCEL_PATH) return send(response, 200, cancelBody)
    if (request.method === 'GET' && path === LIST_PATH) return send(response, 200, listBody)
    send(response, 404, notFound)
  })
})
server.listen(Number(process.env.PORT ?? 0), '127.0.0.1', function listening () {
  process.stdout.write(`${JSON.stringify({ port: server.address().port })}\n`)
})
process.on('SIGTERM', () => { server.closeAllConnections(); server.close(() => process.exit(0)) })

import t from 'tap'
import { request } from 'node:http'
import { connect } from 'node:net'
import { once } from 'node:events'
import { setTimeout as sleep } from 'node:timers/promises'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'
import { captureLogs, listen, scanLogs, startSandboxedApp } from './support.js'
import { startRedis } from '../helpers/redis.js'

/**
 * A client that leaves before its answer: the request runs to its end (a cancel may go), and its
 * audit record, access line and duration are written all the same, once.
 */

/** Waits (up to 5 s) for the sandbox to have cancelled `id`: the request's client is gone, so no answer says when. */
async function untilCancelled (sandbox: { control: { isCancelled: (id: string) => boolean } }, id: string): Promise<void> {
  const by = Date.now() + 5000
  while (!sandbox.control.isCancelled(id) && Date.now() < by) await sleep(20)
}

const alice = DEMO_PATIENTS[0]!
const appointment = alice.appointments[0]!

t.test('a cancel whose client left before the answer is still audited, logged and measured, once', async (t) => {
  const { lines, stream } = captureLogs()
  const { app, sandbox, auth } = await startSandboxedApp(t, { upstreamTimeoutMs: 3000, email: alice.email, logStream: stream })
  sandbox.control.setFailure({ kind: 'slow', delayMs: 400, endpoint: 'cancel', times: 1 })
  const origin = await listen(app)
  const body = JSON.stringify({ reason: 'left-early reason' })
  const sent = request(`${origin}/appointments/${appointment.id}/cancel`, {
    method: 'POST',
    headers: { ...auth, 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(body)), 'x-request-id': 'client-left-1' }
  })
  sent.on('error', () => {})
  sent.end(body)
  // The client gives up while the upstream is still working on the cancel.
  await sleep(150)
  sent.destroy()
  await untilCancelled(sandbox, appointment.id)
  t.ok(sandbox.control.isCancelled(appointment.id), 'the cancel went ahead')
  await sleep(300)

  const completed = lines.map((line) => JSON.parse(line) as { msg?: string, reqId?: string, res?: { statusCode?: number }, audit?: { outcome?: string, requestId?: string } })
    .filter((line) => line.msg === 'request completed' && line.reqId === 'client-left-1')
  t.equal(completed.length, 1, 'one access line')
  t.equal(completed[0]?.res?.statusCode, 200, 'with the answer the request came to')
  t.match(completed[0]?.audit, { outcome: 'cancelled', requestId: 'client-left-1' }, 'carrying the audit record')
  const metrics = await app.metrics.registry.getSingleMetricAsString('http_request_duration_seconds')
  t.match(metrics, /http_request_duration_seconds_count\{[^}]*route="\/appointments\/:id\/cancel"[^}]*status_code="200"[^}]*\} 1$/m, 'and one duration sample')
  scanLogs(t, lines, { reason: 'left-early reason', email: alice.email })
})

t.test('a shutdown waits for a request whose client left: its cancel\'s record and audit line are written before close() ends', async (t) => {
  const { lines, stream } = captureLogs()
  // Redis: after the upstream's answer the handler still has round trips to make (the key's
  // record), then the access line; a shutdown that ended with the connection lost them.
  const { app, sandbox, auth } = await startSandboxedApp(t, { upstreamTimeoutMs: 3000, email: alice.email, logStream: stream, redis: await startRedis(t) })
  const target = alice.appointments[1]!
  sandbox.control.setFailure({ kind: 'slow', delayMs: 800, endpoint: 'cancel', times: 1 })
  const origin = await listen(app)
  const body = JSON.stringify({ reason: 'drain reason' })
  const sent = request(`${origin}/appointments/${target.id}/cancel`, {
    method: 'POST',
    headers: { ...auth, 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(body)), 'x-request-id': 'left-then-drain', 'idempotency-key': 'drain-key-1' }
  })
  sent.on('error', () => {})
  sent.end(body)
  await sleep(300)
  sent.destroy()
  await sleep(50)
  await app.close()
  t.ok(sandbox.control.isCancelled(target.id), 'the cancel went through')
  const audited = lines.map((line) => JSON.parse(line) as { reqId?: string, audit?: { outcome?: string } })
    .filter((line) => line.reqId === 'left-then-drain' && line.audit !== undefined)
  t.equal(audited.length, 1, 'its audit line was written before close() ended (server.ts exits then)')
  t.equal(audited[0]?.audit?.outcome, 'cancelled')
  t.notOk(lines.some((line) => line.includes('requests still running at the deadline')), 'well within the deadline')
})

t.test('pipelined requests whose connection closed while their handlers ran: each has its line, and a shutdown waits for none', async (t) => {
  const { lines, stream } = captureLogs()
  const { app, sandbox, token } = await startSandboxedApp(t, { upstreamTimeoutMs: 3000, email: alice.email, logStream: stream })
  const target = alice.appointments[2]!
  // Each call slow: the connection is gone before any handler ends. Node had given no socket
  // yet to the answers queued behind the first.
  sandbox.control.setFailure({ kind: 'slow', delayMs: 400, endpoint: 'any', times: 5 })
  const port = Number(new URL(await listen(app)).port)
  const socket = connect(port, '127.0.0.1')
  socket.on('error', () => {})
  await once(socket, 'connect')
  const body = JSON.stringify({ reason: 'pipelined reason' })
  const list = (id: string): string => `GET /appointments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\nX-Request-Id: ${id}\r\n\r\n`
  socket.write(list('pipe-1') + list('pipe-2') +
    `POST /appointments/${target.id}/cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\nX-Request-Id: pipe-cancel\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`)
  await sleep(150)
  socket.destroy()
  await untilCancelled(sandbox, target.id)
  t.ok(sandbox.control.isCancelled(target.id), 'the pipelined cancel went through')
  await sleep(300)
  const completed = lines.map((line) => JSON.parse(line) as { msg?: string, reqId?: string, audit?: { outcome?: string } })
    .filter((line) => line.msg === 'request completed' && line.reqId?.startsWith('pipe-') === true)
  t.same(completed.map((line) => line.reqId).sort(), ['pipe-1', 'pipe-2', 'pipe-cancel'], 'one access line each')
  t.equal(completed.find((line) => line.reqId === 'pipe-cancel')?.audit?.outcome, 'cancelled', 'the cancel\'s carrying its audit record')
  const started = Date.now()
  await app.close()
  t.ok(Date.now() - started < 2000, `close() waits for none of them (${Date.now() - started} ms)`)
  t.notOk(lines.some((line) => line.includes('requests still running at the deadline')))
  scanLogs(t, lines, { reason: 'pipelined reason', email: alice.email })
})

import t from 'tap'
import { connect, type Socket } from 'node:net'
import { once } from 'node:events'
import { setTimeout as sleep } from 'node:timers/promises'
import { buildTestApp } from '../helpers/app.js'
import { shutdownDeadlineFor } from '../../src/app.js'
import { buildMetricsServer } from '../../src/metrics.js'
import { captureLogs, parseRawAnswer as parse } from '../fault/support.js'

/**
 * Clients that stop reading, and the metrics listener's cut-offs: a connection is bounded at every
 * stage, on both listeners.
 */

async function open (port: number): Promise<{ socket: Socket, received: () => string, closedAfter: () => Promise<number> }> {
  const socket = connect(port, '127.0.0.1')
  socket.on('error', () => {})
  await once(socket, 'connect')
  const started = Date.now()
  let data = ''
  socket.on('data', (chunk: Buffer) => { data += chunk.toString('latin1') })
  const closed = once(socket, 'close').then(() => Date.now() - started)
  return { socket, received: () => data, closedAfter: async () => await closed }
}

t.test('public listener: a connection with a request in it stays silent at most as long as the longest request runs', async (t) => {
  const { lines, stream } = captureLogs()
  const { app } = await buildTestApp(t, { logStream: stream, env: { RATE_LIMIT_IP: '100000/1m', CV_TIMEOUT_MS: '3000' } })
  t.equal(app.server.timeout, 2 * shutdownDeadlineFor(3000), 'past the longest request, a follower that then led included')
  t.equal(app.server.requestTimeout, 10_000)
  t.equal(app.server.headersTimeout, 5_000)
  t.equal(app.server.keepAliveTimeout, 65_000, 'between requests: the keep-alive timeout instead')
  await app.listen({ host: '127.0.0.1', port: 0 })
  // The same mechanism, on a scale a test can wait for.
  app.server.timeout = 600
  const { port } = app.server.address() as { port: number }

  // A client that asks for much and reads nothing: its answers fill the socket's buffers.
  // It reads nothing, so it never sees its connection end: the server's count of them does.
  const connections = async (): Promise<number> => await new Promise((resolve, reject) => {
    app.server.getConnections((error, count) => { if (error === null) resolve(count); else reject(error) })
  })
  const reader = await open(port)
  reader.socket.pause()
  reader.socket.write('GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n'.repeat(400))
  const started = Date.now()
  await sleep(100)
  t.equal(await connections(), 1, 'its connection is open while answers go out')
  while (await connections() > 0 && Date.now() - started < 8000) await sleep(50)
  const cutAfter = Date.now() - started
  t.ok(cutAfter >= 500 && cutAfter < 7000, `a client that stopped reading is cut off (${cutAfter} ms)`)
  reader.socket.destroy()
  // Every request it sent was handled, and each has its access line: the one cut off mid-write
  // and those queued behind it too (Node drops them with the connection; Fastify, waiting for
  // their `finish`, would log none of them).
  await sleep(100)
  const logged = lines.filter((line) => line.includes('"request completed"') && line.includes('/openapi.json')).length
  t.equal(logged, 400, 'one access line per request')

  // One that read its answer and keeps the connection idle is the keep-alive timeout's.
  const idle = await open(port)
  idle.socket.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n')
  await sleep(1500)
  t.equal(parse(idle.received())?.status, 200)
  t.notOk(idle.socket.destroyed || idle.socket.readyState !== 'open', 'an idle keep-alive connection outlives the silence bound')
  idle.socket.destroy()
})

t.test('metrics listener: the public listener\'s cut-offs, and no body worth reading', async (t) => {
  const { app } = await buildTestApp(t)
  const server = buildMetricsServer(app.metrics.registry)
  t.teardown(() => server.close())
  await server.listen({ host: '127.0.0.1', port: 0 })
  t.equal(server.server.requestTimeout, 10_000)
  t.equal(server.server.headersTimeout, 5_000)
  t.equal(server.server.timeout, 30_000)
  const large = await server.inject({ method: 'POST', url: '/metrics', headers: { 'content-type': 'application/json' }, payload: JSON.stringify({ x: 'y'.repeat(2048) }) })
  t.equal(large.statusCode, 404, 'a body over 1 KiB is not read: the 404 it would get anyway')

  const { port } = server.server.address() as { port: number }
  const trickle = await open(port)
  trickle.socket.write('GET /metrics HTTP/1.1\r\n')
  const dripping = setInterval(() => { if (!trickle.socket.destroyed) trickle.socket.write('x') }, 500)
  t.teardown(() => { clearInterval(dripping) })
  const after = await Promise.race([trickle.closedAfter(), sleep(12_000).then(() => -1)])
  clearInterval(dripping)
  t.ok(after >= 4800 && after < 8000, `headers trickled: cut off after the headers timeout (${after} ms)`)
  const answer = parse(trickle.received())
  t.equal(answer?.status, 408)
  t.has(JSON.parse(answer?.body ?? '{}'), { status: 408, code: 'VALIDATION_FAILED', message: 'Request timed out' })
})

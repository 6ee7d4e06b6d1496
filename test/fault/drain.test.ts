import t from 'tap'
import { connect, type Socket } from 'node:net'
import { once } from 'node:events'
import { setTimeout as sleep } from 'node:timers/promises'
import { buildTestApp } from '../helpers/app.js'
import Fastify from 'fastify'
import { shutdownDeadlineFor, trackRunningRequests } from '../../src/app.js'
import { call, listen } from './support.js'

/**
 * Shutdown and clients that are still sending: Node stops enforcing headersTimeout once the server
 * closes, so the service does it for the connections it is draining (app.ts, drainOnClose).
 */

async function rawConnection (port: number, sent: string): Promise<{ socket: Socket, received: () => string, closed: Promise<unknown> }> {
  const socket = connect(port, '127.0.0.1')
  await once(socket, 'connect')
  let data = ''
  socket.on('data', (chunk: Buffer) => { data += chunk.toString() })
  const closed = once(socket, 'close')
  if (sent !== '') socket.write(sent)
  return { socket, received: () => data, closed }
}

t.test('at shutdown, a client still sending its headers gets a 408 after headersTimeout, and the shutdown ends', async (t) => {
  const { app } = await buildTestApp(t)
  const origin = await listen(app)
  const port = Number(new URL(origin).port)
  // A request line and a header, never the blank line that ends the headers.
  const slow = await rawConnection(port, 'GET /healthz HTTP/1.1\r\nhost: x\r\nx-request-id: slow-1\r\n')
  // A kept-alive connection that had its answer, and one that never said anything.
  const answered = await rawConnection(port, 'GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n')
  const silent = await rawConnection(port, '')
  await sleep(100)
  t.match(answered.received(), /^HTTP\/1\.1 200 /, 'the kept-alive connection had its answer')

  const started = Date.now()
  const closing = app.close()
  // Bounded, whatever happens: without the cut-off, close() waits for the slow client for ever.
  const outcome = await Promise.race([closing.then(() => 'closed'), sleep(9000).then(() => 'still open')])
  const took = Date.now() - started
  t.equal(outcome, 'closed', 'the shutdown ends')
  t.ok(took >= app.server.headersTimeout - 200 && took < app.server.headersTimeout + 2000, `after headersTimeout (${took} ms)`)
  // Never hang the suite: a shutdown still waiting is released by ending the clients.
  if (outcome !== 'closed') for (const { socket } of [slow, answered, silent]) socket.destroy()
  await Promise.all([slow.closed, answered.closed, silent.closed])
  t.match(slow.received(), /^HTTP\/1\.1 408 /, 'the slow client is answered 408, as a running server answers it')
  t.match(slow.received(), /"code":"VALIDATION_FAILED"/, 'in the envelope')
  t.match(silent.received(), /^HTTP\/1\.1 408 /, 'so is a connection that never sent a byte (as a running server answers it)')
  t.equal(answered.received().match(/HTTP\/1\.1 /g)?.length, 1, 'the idle kept-alive connection is closed at once, with no other answer')
})

t.test('at shutdown, a request in flight is answered even when it outlasts headersTimeout', async (t) => {
  const { app } = await buildTestApp(t)
  // A route that answers after the cut-off would have run.
  app.server.headersTimeout = 300
  const origin = await listen(app)
  const port = Number(new URL(origin).port)
  // Its headers are in; its body is still coming.
  const body = '{"idToken":"x"}'
  const uploading = await rawConnection(port, `POST /auth/session HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n{`)
  await sleep(50)
  const closing = app.close()
  await sleep(800)
  t.equal(uploading.received(), '', 'not cut off while its body arrives')
  uploading.socket.write(body.slice(1))
  await closing
  await uploading.closed
  t.match(uploading.received(), /^HTTP\/1\.1 401 /, 'answered (an invalid token), then closed')
  t.match(uploading.received(), /connection: close/i)
  // The server is closed: nothing else gets in.
  await t.rejects(call(origin, { path: '/healthz', timeoutMs: 1000 }))
})

t.test('the shutdown deadline outlasts the last request it may take: its arrival, three upstream calls and a margin', async (t) => {
  t.equal(shutdownDeadlineFor(5000), 27_000, 'the default CV_TIMEOUT_MS: 10 s to arrive, 3 x 5 s + 2 s to run')
  t.equal(shutdownDeadlineFor(20_000), 72_000)
  t.equal(shutdownDeadlineFor(1000), 27_000, 'a short upstream deadline: a web sign-in\'s three calls to the IdP still fit')
  const { app } = await buildTestApp(t)
  t.equal(app.server.requestTimeout, 10_000, 'the arrival time it counts is the server\'s own')
})

t.test('the wait for running requests is bounded: one that never settles is reported, and close() goes on', async (t) => {
  const lines: Array<{ msg: string, requests?: number, of?: number }> = []
  const app = Fastify({ logger: { level: 'warn', stream: { write (line: string) { lines.push(JSON.parse(line)) } } } })
  const tracking = trackRunningRequests(app)
  let release: () => void = () => {}
  app.get('/stuck', async () => { await new Promise<void>((resolve) => { release = resolve }); return {} })
  app.get('/quick', async () => ({}))
  tracking.settleOnClose(150)
  await app.ready()
  t.equal((await app.inject({ url: '/quick' })).statusCode, 200)
  t.equal((await app.inject({ url: '/nowhere' })).statusCode, 404, 'a 404 is never counted (its handler has nothing to leave behind)')
  const stuck = app.inject({ url: '/stuck' })
  await sleep(20)
  const started = Date.now()
  await app.close()
  const waited = Date.now() - started
  t.ok(waited >= 140 && waited < 2000, `close() waited for the bound, then went on (${waited} ms)`)
  t.same(lines.map(({ msg, requests, of }) => ({ msg, requests, of })), [{ msg: 'shutdown: requests still running at the deadline', requests: 1, of: 1 }])
  release()
  await stuck
})

t.test('requests of every kind leave nothing counted as running: a shutdown after them is immediate', async (t) => {
  const { app } = await buildTestApp(t, { env: { RATE_LIMIT_IP: '12/1m' } })
  const answers: number[] = []
  for (const request of [
    { method: 'GET' as const, url: '/healthz' },
    { method: 'HEAD' as const, url: '/readyz' },
    { method: 'HEAD' as const, url: '/openapi.json' },
    { method: 'GET' as const, url: '/auth/me' },
    { method: 'GET' as const, url: '/appointments' },
    { method: 'POST' as const, url: '/appointments/not-a-uuid/cancel', headers: { authorization: 'Bearer x' } },
    { method: 'POST' as const, url: '/auth/session', payload: { idToken: 'not.a.token' } },
    { method: 'POST' as const, url: '/auth/session', payload: '{', headers: { 'content-type': 'application/json' } },
    { method: 'POST' as const, url: '/auth/logout' },
    { method: 'DELETE' as const, url: '/nowhere' },
    ...Array.from({ length: 6 }, () => ({ method: 'GET' as const, url: '/auth/me' }))
  ]) answers.push((await app.inject(request)).statusCode)
  t.same([...new Set(answers)].sort(), [200, 400, 401, 404, 429], 'answered, refused, invalid, unknown and limited alike')
  const started = Date.now()
  await app.close()
  t.ok(Date.now() - started < 1000, `close() waited for nothing (${Date.now() - started} ms)`)
})

t.test('the report at the deadline counts the requests still running, of those running when the wait began', async (t) => {
  const lines: Array<{ msg: string, requests?: number, of?: number }> = []
  const app = Fastify({ logger: { level: 'warn', stream: { write (line: string) { lines.push(JSON.parse(line)) } } } })
  const tracking = trackRunningRequests(app)
  const releases: Array<() => void> = []
  app.get('/stuck', async () => { await new Promise<void>((resolve) => { releases.push(resolve) }); return {} })
  tracking.settleOnClose(300)
  await app.ready()
  const stuck = [app.inject({ url: '/stuck' }), app.inject({ url: '/stuck' })]
  await sleep(20)
  const closing = app.close()
  await sleep(50)
  releases[0]?.()
  await closing
  t.same(lines.map(({ msg, requests, of }) => ({ msg, requests, of })), [{ msg: 'shutdown: requests still running at the deadline', requests: 1, of: 2 }])
  releases[1]?.()
  await Promise.all(stuck)
})

/**
 * A request answered, keep-alive, before its body arrived (here a 401: no token), the body still
 * arriving when the shutdown begins: close() finds the connection busy and leaves it. Once the
 * body is in, the connection is idle, and nothing closed it until the headers timeout's cut-off,
 * which wrote a 408 the client never asked for (its request was answered) and held the shutdown
 * that long.
 */
t.test('at shutdown, a connection whose request was answered before its body arrived closes once the body is in', async (t) => {
  const { app } = await buildTestApp(t)
  const port = Number(new URL(await listen(app)).port)
  const client = await rawConnection(port, 'POST /appointments/a1/cancel HTTP/1.1\r\nhost: x\r\n' +
    'content-type: application/json\r\ncontent-length: 30\r\n\r\n{"reason":')
  client.socket.on('error', () => {})
  for (let i = 0; i < 100 && !client.received().includes('\r\n\r\n{'); i++) await sleep(10)
  t.match(client.received(), /^HTTP\/1\.1 401 [^]*\r\nconnection: keep-alive\r\n/i, 'refused keep-alive before its body')
  const started = Date.now()
  const closing = app.close()
  await sleep(100)
  client.socket.write('"feeling better"}'.padEnd(20, ' '))
  const closed = await Promise.race([client.closed.then(() => true), sleep(3000).then(() => false)])
  const outcome = await Promise.race([closing.then(() => 'closed'), sleep(1000).then(() => 'still open')])
  const took = Date.now() - started
  client.socket.destroy()
  await closing
  t.ok(closed, `the connection is closed once the body is in (${took} ms)`)
  t.equal(outcome, 'closed', 'and the shutdown ends')
  t.equal(client.received().match(/HTTP\/1\.1 /g)?.length, 1, 'with no second answer')
})

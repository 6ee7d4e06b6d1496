import t, { type Test } from 'tap'
import { once } from 'node:events'
import { connect, type Socket } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'
import { cancelOnSocket, exchange, statuses } from './support.js'
import { buildTestApp } from '../helpers/app.js'
import { captureLogs } from '../fault/support.js'

/**
 * While draining (SHUTDOWN_DELAY, then close()), every answer closes its connection. A client that
 * pipelined a second request behind the first must not have it run with no answer written (Node
 * writes nothing behind an answer that closes the connection): the cancel would reach the upstream
 * and the client, told nothing, retries it elsewhere. Requests already read are answered, and the
 * last of them closes the connection.
 */
function pipelined (token: string, id: string, body: string): string {
  return 'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n' +
    `POST /appointments/${id}/cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n` +
    `Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`
}

t.test('requests pipelined on a connection while draining are each answered, the last closing it', async (t) => {
  const { app, port, sandbox, token, id, body } = await cancelOnSocket(t)
  app.draining = true
  const { received, closed } = await exchange(port, pipelined(token, id, body))
  t.same(statuses(received), [200, 200], 'both answered')
  t.ok(closed, 'the connection is closed after the last')
  const heads = received.split(/(?=HTTP\/1\.1 )/)
  t.notMatch(heads[0], /\r\nconnection: close\r\n/i, 'the first answer leaves the connection open for the one behind it')
  t.match(heads[1], /\r\nconnection: close\r\n/i, 'the last answer closes it')
  t.ok(sandbox.control.isCancelled(id), 'the cancel went through and its answer was written')
})

/**
 * While draining, sends `first` on a fresh connection and, once its answer (which closes the
 * connection) is in, a cancel on the same connection; what the connection received, and whether
 * the cancel was acted on. Node closes the socket once the closing answer is flushed; until then
 * it still reads and hands a request to its route. Here the close waits 300 ms (a slow flush), so
 * that the cancel is surely read in that window.
 */
async function cancelBehindClosingAnswer (t: Test, first: string): Promise<{ received: string, cancelsSent: number, cancelled: boolean }> {
  const { app, port, sandbox, token, id, body } = await cancelOnSocket(t)
  app.server.prependListener('connection', (socket: Socket) => {
    const destroySoon = socket.destroySoon.bind(socket)
    socket.destroySoon = () => { setTimeout(destroySoon, 300) }
  })
  app.draining = true
  const socket = connect(port, '127.0.0.1')
  let received = ''
  socket.on('data', (chunk: Buffer) => { received += chunk.toString('latin1') })
  const closed = once(socket, 'close')
  await once(socket, 'connect')
  socket.write(first)
  for (let i = 0; i < 200 && !received.includes('\r\n\r\n{'); i++) await sleep(5)
  const firstAnswer = received
  socket.write(`POST /appointments/${id}/cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n` +
    `Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`)
  await Promise.race([closed, sleep(3000)])
  socket.destroy()
  await sleep(300)
  t.match(firstAnswer, /\r\nconnection: close\r\n/i, 'the first answer closes the connection')
  return { received, cancelsSent: sandbox.control.calls.filter((call) => call.method === 'POST').length, cancelled: sandbox.control.isCancelled(id) }
}

t.test('a request read behind an answer that closes its connection while draining is not acted on', async (t) => {
  const { received, cancelsSent, cancelled } = await cancelBehindClosingAnswer(t, 'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n')
  // Behind the answer that closes the connection, nothing but the refusal (written here only
  // because the close was held back).
  t.same(statuses(received).slice(0, 1), [200], 'the first answer')
  t.ok(statuses(received).slice(1).every((status) => status === 400), 'the one behind it, if written at all, refused')
  t.equal(cancelsSent, 0, 'no cancel reaches the upstream')
  t.notOk(cancelled, 'the appointment is not cancelled')
})

/** An answer refused before routing (no hook runs for it) closes its connection while draining too. */
t.test('while draining, a request refused before routing (a malformed URL) has its connection closed', async (t) => {
  const { app, port } = await cancelOnSocket(t)
  app.draining = true
  const { received, closed } = await exchange(port, 'GET /%zz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n')
  t.same(statuses(received), [400], 'one answer, the refusal')
  t.match(received, /\r\nconnection: close\r\n/i, 'saying the connection closes')
  t.ok(closed, 'and it does')
})

t.test('a shutdown does not wait for a connection whose request, arriving during it, was refused before routing', async (t) => {
  const { app, port } = await cancelOnSocket(t)
  const socket = connect(port, '127.0.0.1')
  await once(socket, 'connect')
  let received = ''
  socket.on('data', (chunk: Buffer) => { received += chunk.toString('latin1') })
  const ended = once(socket, 'close')
  // Its headers are not finished when the shutdown begins: the connection is not idle.
  socket.write('GET /%zz HTTP/1.1\r\nHost: x\r\n')
  await sleep(50)
  const began = Date.now()
  const closing = app.close()
  await sleep(50)
  socket.write('\r\n')
  const outcome = await Promise.race([closing.then(() => 'closed'), sleep(4000).then(() => 'still open')])
  const took = Date.now() - began
  await Promise.race([ended, sleep(2000)])
  socket.destroy()
  await closing
  t.equal(outcome, 'closed', `the shutdown ends once the refusal is written (${took} ms), not at the headers timeout's sweep`)
  t.match(received, /^HTTP\/1\.1 400 /, 'the request was answered')
})

/**
 * The last request read on a connection was answered before the drain began, its answer queued
 * behind a slower request's: that answer went out keep-alive, and the slower one's, no longer the
 * last read, did not close the connection either. Nothing closed it: close() found it busy (no
 * idle connection to end) and then waited for it until the keep-alive timeout (65 s).
 */
t.test('a connection whose last answer was queued before the drain, behind a slower one, still closes', async (t) => {
  const { app, port, sandbox, token, id, body } = await cancelOnSocket(t)
  sandbox.control.setFailure({ kind: 'slow', delayMs: 600, endpoint: 'cancel', times: 1 })
  const socket = connect(port, '127.0.0.1')
  let received = ''
  socket.on('data', (chunk: Buffer) => { received += chunk.toString('latin1') })
  const closed = once(socket, 'close').then(() => true)
  await once(socket, 'connect')
  socket.write(`POST /appointments/${id}/cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n` +
    `Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}` +
    'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n')
  // /healthz is answered (queued behind the cancel) before the shutdown begins.
  await sleep(250)
  const began = Date.now()
  const closing = app.close()
  const outcome = await Promise.race([closing.then(() => 'closed'), sleep(3000).then(() => 'still open')])
  const took = Date.now() - began
  const socketClosed = await Promise.race([closed, sleep(100).then(() => false)])
  socket.destroy()
  await closing
  t.same(statuses(received), [200, 200], 'both answered')
  t.ok(sandbox.control.isCancelled(id), 'the cancel went through')
  t.ok(socketClosed, 'the connection is closed after the last answer')
  t.equal(outcome, 'closed', `the shutdown ends once both answers are written (${took} ms)`)
})

/**
 * Once close() began, Fastify itself says `Connection: close` to every request it routes (on the
 * raw response): the first of two pipelined then, /healthz, closed the connection, and the cancel
 * behind it reached Care360 and was never answered.
 */
t.test('requests pipelined after close() began are each answered, the last closing the connection', async (t) => {
  const { app, port, sandbox, token, id, body } = await cancelOnSocket(t)
  const second = DEMO_PATIENTS[0]!.appointments[1]!.id
  sandbox.control.setFailure({ kind: 'slow', delayMs: 400, endpoint: 'cancel', times: 1 })
  const socket = connect(port, '127.0.0.1')
  let received = ''
  socket.on('data', (chunk: Buffer) => { received += chunk.toString('latin1') })
  const closed = once(socket, 'close').then(() => true)
  await once(socket, 'connect')
  const cancel = (appointment: string): string => `POST /appointments/${appointment}/cancel HTTP/1.1\r\nHost: x\r\n` +
    `Authorization: Bearer ${token}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`
  // In flight when the shutdown begins: the connection is not idle, close() leaves it open.
  socket.write(cancel(id))
  await sleep(100)
  const closing = app.close()
  await sleep(20)
  socket.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n' + cancel(second))
  const socketClosed = await Promise.race([closed, sleep(3000).then(() => false)])
  socket.destroy()
  await closing
  t.same(statuses(received), [200, 200, 200], 'all three answered')
  t.ok(sandbox.control.isCancelled(second), 'the last cancel went through, its answer written')
  t.match(received.split(/(?=HTTP\/1\.1 )/)[2], /\r\nconnection: close\r\n/i, 'the last answer closes the connection')
  t.ok(socketClosed, 'and it is closed')
})

/**
 * A request refused before routing behind one still running: a malformed URL (no hook runs for
 * it), or an unsupported Expect (which Fastify never sees). Its refusal closes the connection
 * while draining; the request before it, were it still noted as the last read (by an onRequest
 * hook), would close it too, and the refusal, logged and counted, would never be written.
 */
for (const [refused, status, why] of [
  ['GET /%zz HTTP/1.1\r\nHost: x\r\n\r\n', 400, 'a malformed URL'],
  ['GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: bogus\r\n\r\n', 417, 'an unsupported Expect']
] as const) {
  t.test(`while draining, ${why} pipelined behind a running request is answered after it`, async (t) => {
    const { app, port, sandbox, token, id, body } = await cancelOnSocket(t)
    sandbox.control.setFailure({ kind: 'slow', delayMs: 300, endpoint: 'cancel', times: 1 })
    app.draining = true
    const { received, closed } = await exchange(port, `POST /appointments/${id}/cancel HTTP/1.1\r\nHost: x\r\n` +
      `Authorization: Bearer ${token}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}` + refused)
    t.same(statuses(received), [200, status], 'the cancel answered, then the refusal')
    const heads = received.split(/(?=HTTP\/1\.1 )/)
    t.notMatch(heads[0], /\r\nconnection: close\r\n/i, 'the cancel leaves the connection open for the refusal')
    t.match(heads[1], /\r\nconnection: close\r\n/i, 'the refusal closes it')
    t.ok(closed, 'and it is closed')
  })
}

t.test('while draining, a request read behind a refusal before routing is not acted on either', async (t) => {
  const { received, cancelsSent, cancelled } = await cancelBehindClosingAnswer(t, 'GET /%zz HTTP/1.1\r\nHost: x\r\n\r\n')
  t.same(statuses(received).slice(0, 1), [400], 'the refusal')
  t.ok(statuses(received).slice(1).every((status) => status === 400), 'the one behind it, if written at all, refused')
  t.equal(cancelsSent, 0, 'no cancel reaches the upstream')
  t.notOk(cancelled, 'the appointment is not cancelled')
})

/**
 * A client that reads slowly: the answers to its requests, all read and answered keep-alive before
 * the drain began, are still going out to it. close() destroyed the connection as idle (Node's
 * sweep looks at whether the answer on the socket has ended, not whether it was written): what
 * the socket's buffers held was delivered (about 100 answers here) and the rest lost. Spared, it
 * must still close after the last answer, which said nothing of closing.
 */
t.test('a connection whose answers are still going out to a slow reader when the drain begins closes after the last', async (t) => {
  const { lines, stream } = captureLogs()
  const { app } = await buildTestApp(t, { logStream: stream, env: { RATE_LIMIT_IP: '100000/1m' } })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as { port: number }
  const socket = connect(port, '127.0.0.1')
  socket.on('error', () => {})
  await once(socket, 'connect')
  socket.pause()
  let received = ''
  socket.on('data', (chunk: Buffer) => { received += chunk.toString('latin1') })
  const closed = once(socket, 'close').then(() => true)
  // More than the socket buffers hold: the answers are still being written when the drain begins.
  const count = 400
  socket.write('GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n'.repeat(count))
  // Node read them all at once (one chunk); their answers, made at once, wait in its queue.
  let read = 0
  const allRead = new Promise<void>((resolve) => { app.server.on('request', () => { if (++read === count) resolve() }) })
  await Promise.race([allRead, sleep(4000)])
  await sleep(200)
  t.equal(read, count, 'every request was read before the drain')
  const closing = app.close()
  socket.resume()
  // The client's close, once it has read everything (on a busy machine, well after the server's).
  const socketClosed = await Promise.race([closed, sleep(10_000).then(() => false)])
  const outcome = await Promise.race([closing.then(() => 'closed'), sleep(1000).then(() => 'still open')])
  socket.destroy()
  t.equal(outcome, 'closed', 'the shutdown ends once the answers are written')
  t.ok(socketClosed, 'the connection is closed after the last answer')
  t.equal(statuses(received).length, count, 'every answer was written')
  t.equal(lines.filter((line) => line.includes('"request completed"')).length, count, 'and logged')
})

/**
 * A slow cancel, then /healthz pipelined behind it (its answer queued, made keep-alive before any
 * drain) and `then`, on one connection: the app, what the connection received, and its close.
 */
async function slowCancelThenHealthz (t: Test, delayMs: number, then: string): Promise<{
  app: Awaited<ReturnType<typeof cancelOnSocket>>['app']
  socket: Socket
  received: () => string
  closed: Promise<boolean>
}> {
  const { app, port, sandbox, token, id, body } = await cancelOnSocket(t)
  sandbox.control.setFailure({ kind: 'slow', delayMs, endpoint: 'cancel', times: 1 })
  const socket = connect(port, '127.0.0.1')
  socket.on('error', () => {})
  let received = ''
  socket.on('data', (chunk: Buffer) => { received += chunk.toString('latin1') })
  const closed = once(socket, 'close').then(() => true)
  await once(socket, 'connect')
  socket.write(`POST /appointments/${id}/cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n` +
    `Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}` +
    'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n' + then)
  return { app, socket, received: () => received, closed }
}

/** Once the connection closed (or 3 s), whether it did, and whether `closing` then ends. */
async function closedAndShutDown (socket: Socket, closed: Promise<boolean>, closing: Promise<unknown>): Promise<{ socketClosed: boolean, outcome: string }> {
  const socketClosed = await Promise.race([closed, sleep(3000).then(() => false)])
  socket.destroy()
  const outcome = await Promise.race([closing.then(() => 'closed'), sleep(2000).then(() => 'still open')])
  return { socketClosed, outcome }
}

/**
 * A client already sending its next request when the shutdown begins, on a connection whose last
 * answer (queued behind a slower one) went out keep-alive before it: its request is in flight, as
 * one whose headers arrive on an idle connection is (answered, or a 408 after the headers
 * timeout). The connection was closed as soon as that answer was written, the request cut off
 * halfway through its headers.
 */
t.test('a request whose headers are arriving when the last answer before the drain is written is still answered', async (t) => {
  const { app, socket, received, closed } = await slowCancelThenHealthz(t, 600, 'GET /readyz HTTP/1.1\r\nHost: x\r\n')
  // /healthz is answered (queued behind the cancel) before the shutdown begins; /readyz's headers
  // are not finished.
  await sleep(250)
  const closing = app.close()
  for (let i = 0; i < 300 && statuses(received()).length < 2; i++) await sleep(10)
  await sleep(100)
  socket.write('\r\n')
  const { socketClosed, outcome } = await closedAndShutDown(socket, closed, closing)
  t.same(statuses(received()), [200, 200, 503], 'the cancel and /healthz answered, then /readyz (unready)')
  t.match(received().split(/(?=HTTP\/1\.1 )/)[2], /\r\nconnection: close\r\n/i, 'its answer closes the connection')
  t.ok(socketClosed, 'and it is closed')
  t.equal(outcome, 'closed', 'the shutdown ends')
})

/**
 * The same connection, its client sending a malformed request during the drain: the parser's
 * refusal waits for the answers before it (clientErrorAnswer), the last of them answered
 * keep-alive before the drain. The connection was closed as soon as that answer was written,
 * before the refusal, logged and counted, could be.
 */
t.test('a malformed request sent during the drain behind the last answer from before it is refused in writing', async (t) => {
  const { app, socket, received, closed } = await slowCancelThenHealthz(t, 600, '')
  // /healthz is answered (queued behind the cancel) before the shutdown begins.
  await sleep(250)
  const closing = app.close()
  await sleep(50)
  socket.write('GET /healthz HTTP/1.1\r\nHost: x\r\nNo colon\r\n\r\n')
  const { socketClosed, outcome } = await closedAndShutDown(socket, closed, closing)
  t.same(statuses(received()), [200, 200, 400], 'the cancel and /healthz answered, then the refusal')
  t.ok(socketClosed, 'the connection is closed after it')
  t.equal(outcome, 'closed', 'the shutdown ends')
})

/**
 * The same connection, its last answer from before the drain written only after the drain's
 * cut-off of unfinished headers had passed (it skipped the connection: an answer was under way),
 * and the next request's headers never finished: nothing ended them, and the shutdown waited
 * for them until its deadline. They get the cut-off's bound, counted from that answer.
 */
t.test('headers still arriving behind an answer written after the drain\'s cut-off get a 408 too', async (t) => {
  const { app, socket, received, closed } = await slowCancelThenHealthz(t, 700, 'GET /readyz HTTP/1.1\r\nHost: x\r\n')
  await sleep(200)
  // The cut-off (the headers timeout, on a scale a test can wait for) passes while the cancel runs.
  app.server.headersTimeout = 200
  const closing = app.close()
  const { socketClosed, outcome } = await closedAndShutDown(socket, closed, closing)
  t.same(statuses(received()), [200, 200, 408], 'the cancel and /healthz answered, then the unfinished request refused')
  t.ok(socketClosed, 'the connection is closed')
  t.equal(outcome, 'closed', 'the shutdown ends')
})

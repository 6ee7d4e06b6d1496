import t from 'tap'
import { cancelOnSocket, exchange, statuses } from './support.js'

/**
 * The 501 closes the connection, so no answer is written for a request pipelined behind it; its
 * handler must not run either (as behind the HTTP/1.0 refusal): the cancel would reach the
 * upstream and the client, never told, retries it elsewhere.
 */
t.test('a request pipelined behind a 501 is not acted on', async (t) => {
  const { port, sandbox, token, id, body } = await cancelOnSocket(t)
  const { received } = await exchange(port,
    `POST /appointments/${id}/cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n` +
    `Content-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n${body.length.toString(16)}\r\n${body}\r\n0\r\n\r\n` +
    `POST /appointments/${id}/cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n` +
    `Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`)
  t.same(statuses(received), [501], 'one answer, the 501')
  await new Promise((resolve) => setTimeout(resolve, 300))
  t.equal(sandbox.control.calls.filter((call) => call.method === 'POST').length, 0, 'no cancel reaches the upstream')
  t.notOk(sandbox.control.isCancelled(id), 'the appointment is not cancelled')
})

/** The same behind the Host refusals (two Hosts), which close the connection too. */
t.test('a request pipelined behind a two-Host refusal is not acted on', async (t) => {
  const { port, sandbox, token, id, body } = await cancelOnSocket(t)
  const { received } = await exchange(port,
    'GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n' +
    `POST /appointments/${id}/cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n` +
    `Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`)
  t.same(statuses(received), [400], 'one answer, the 400')
  await new Promise((resolve) => setTimeout(resolve, 300))
  t.equal(sandbox.control.calls.filter((call) => call.method === 'POST').length, 0, 'no cancel reaches the upstream')
})

/**
 * RFC 9112, 9.6: a server that receives `Connection: close` "MUST NOT process any further requests
 * received on that connection". Node's parser (llhttp) refuses data after such a request, unlike a
 * request read behind an answer the server closes (above, and app.ts while draining): pinned here
 * so that a parser made lenient would be seen.
 */
t.test('a request pipelined behind one that said Connection: close is not acted on', async (t) => {
  const { port, sandbox, token, id, body } = await cancelOnSocket(t)
  const { received, closed } = await exchange(port,
    'GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' +
    `POST /appointments/${id}/cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n` +
    `Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`)
  t.same(statuses(received), [200], 'one answer, to the first')
  t.ok(closed, 'and the connection closed')
  await new Promise((resolve) => setTimeout(resolve, 300))
  t.equal(sandbox.control.calls.filter((call) => call.method === 'POST').length, 0, 'no cancel reaches the upstream')
  t.notOk(sandbox.control.isCancelled(id), 'the appointment is not cancelled')
})

/** The same behind an HTTP/1.0 request without keep-alive, whose connection closes by default. */
t.test('a request pipelined behind an HTTP/1.0 request without keep-alive is not acted on', async (t) => {
  const { port, sandbox, token, id, body } = await cancelOnSocket(t)
  const { received } = await exchange(port,
    'GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n' +
    `POST /appointments/${id}/cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n` +
    `Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`)
  t.same(received.match(/HTTP\/1\.[01] \d{3} /g)?.length, 1, 'one answer, to the first')
  await new Promise((resolve) => setTimeout(resolve, 300))
  t.equal(sandbox.control.calls.filter((call) => call.method === 'POST').length, 0, 'no cancel reaches the upstream')
})

/** And a kept-alive HTTP/1.0 request is no reason to refuse the one behind it. */
t.test('a request pipelined behind an HTTP/1.0 keep-alive request is answered', async (t) => {
  const { port, sandbox, token, id, body } = await cancelOnSocket(t)
  const { received } = await exchange(port,
    'GET /healthz HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n' +
    `POST /appointments/${id}/cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n` +
    `Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`)
  t.same([...received.matchAll(/HTTP\/1\.[01] (\d{3}) /g)].map((m) => m[1]), ['200', '200'], 'both answered')
  t.ok(sandbox.control.isCancelled(id), 'the cancel went through')
})

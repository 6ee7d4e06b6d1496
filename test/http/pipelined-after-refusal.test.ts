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

import t from 'tap'
import { cancelOnSocket, exchange, statuses } from './support.js'

/**
 * A request body in a transfer coding other than chunked (`Transfer-Encoding: gzip, chunked`):
 * Node takes it (chunked is last) but decodes nothing, and the service reads the gzip-coded bytes
 * as if they were the JSON itself, where it refuses the same coding as Content-Encoding (415).
 * RFC 9112 6.1: "A server that receives a request message with a transfer coding it does not
 * understand SHOULD respond with 501 (Not Implemented)". A hop in front that does decode it sees
 * another body than this service acts on.
 */
t.test('a body in a transfer coding other than chunked is refused, never read as plain JSON', async (t) => {
  const { port, sandbox, token, id, body } = await cancelOnSocket(t)
  const { received } = await exchange(port,
    `POST /appointments/${id}/cancel HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer ${token}\r\n` +
    `Content-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n${body.length.toString(16)}\r\n${body}\r\n0\r\n\r\n`)
  const [status] = statuses(received)
  t.equal(status, 501, 'a transfer coding not understood (RFC 9112 6.1)')
  t.equal(sandbox.control.calls.filter((call) => call.method === 'POST').length, 0, 'no cancel reaches the upstream')
  t.notOk(sandbox.control.isCancelled(id), 'the appointment is not cancelled')
})

t.test('chunked is taken in any case (RFC 9112 7: coding names are case-insensitive), as Node\'s parser decodes it', async (t) => {
  const { port, sandbox, token, id, body } = await cancelOnSocket(t)
  const { received } = await exchange(port,
    `POST /appointments/${id}/cancel HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer ${token}\r\n` +
    `Content-Type: application/json\r\nTransfer-Encoding: Chunked\r\n\r\n${body.length.toString(16)}\r\n${body}\r\n0\r\n\r\n`)
  t.same(statuses(received), [200], 'the cancel is served')
  t.ok(sandbox.control.isCancelled(id), 'the appointment is cancelled')
})

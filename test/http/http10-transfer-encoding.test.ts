import t from 'tap'
import { buildTestApp } from '../helpers/app.js'
import { exchange, statuses } from './support.js'

/**
 * RFC 9112, 6.1: Transfer-Encoding does not exist in HTTP/1.0. "A server or client that receives
 * an HTTP/1.0 message containing a Transfer-Encoding header field MUST treat the message as if the
 * framing is faulty, even if a Content-Length is present, and close the connection after
 * processing the message" (faulty framing, 6.3: a 400, then close). An HTTP/1.0 hop in front
 * ignores the field and frames the body otherwise: what this server reads as the end of a chunked
 * body and the start of a next request is, to it, still the first request's body (smuggling).
 */
t.test('an HTTP/1.0 request with Transfer-Encoding is refused and its connection closed; nothing after it is served', async (t) => {
  const { app } = await buildTestApp(t, { env: { RATE_LIMIT_IP: '100000/1m' } })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const port = (app.server.address() as { port: number }).port

  const smuggled = 'GET /healthz HTTP/1.0\r\nx-request-id: smuggled-1\r\n\r\n'
  const { received, closed } = await exchange(port,
    'POST /auth/session HTTP/1.0\r\nConnection: keep-alive\r\nContent-Type: application/json\r\n' +
    'Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n' + smuggled)

  t.same(statuses(received), [400], 'one answer, a 400 (faulty framing)')
  const firstHead = received.slice(0, received.indexOf('\r\n\r\n'))
  t.match(firstHead, /\r\nconnection: close(\r\n|$)/i, 'the answer closes the connection')
  t.ok(closed, 'the connection is closed')
  t.notMatch(received, /smuggled-1/, 'the request behind the chunked body is never served')
})

t.test('an HTTP/1.0 request with Transfer-Encoding is faulty framing (400) whatever the coding, not an unsupported coding (501)', async (t) => {
  const { app } = await buildTestApp(t, { env: { RATE_LIMIT_IP: '100000/1m' } })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const port = (app.server.address() as { port: number }).port
  const { received } = await exchange(port,
    'POST /auth/session HTTP/1.0\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n')
  t.same(statuses(received), [400], 'the framing is faulty before the coding is unknown')
})

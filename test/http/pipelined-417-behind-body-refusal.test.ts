import t from 'tap'
import { cancelOnSocket, exchange, statuses } from './support.js'

/**
 * A body refused after it arrived whole (400) keeps its connection (markClosingAnswer),
 * so what was pipelined behind it is answered in turn. But an unsupported Expect pipelined in the
 * same packet is read (checkExpectation) before the 400 is sent, and its 417 now marks the
 * connection closing: markClosingAnswer then skips the 400 (isClosing), which keeps Fastify's
 * `Connection: close`, and Node ends the connection after the 400: the 417 is never written.
 */
t.test('a 417 pipelined behind a malformed JSON body is answered', async (t) => {
  const { port } = await cancelOnSocket(t)
  const first = 'POST /auth/session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1\r\n\r\n{'
  const second = 'GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: something-else\r\n\r\n'
  const { received } = await exchange(port, first + second)
  t.same(statuses(received), [400, 417], 'the 400, then the 417')
})

t.test('a GET pipelined behind a malformed JSON body is answered (control)', async (t) => {
  const { port } = await cancelOnSocket(t)
  const first = 'POST /auth/session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1\r\n\r\n{'
  const second = 'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n'
  const { received } = await exchange(port, first + second)
  t.same(statuses(received), [400, 200], 'the 400, then the 200')
})

import t from 'tap'
import { cancelOnSocket, exchange, statuses } from './support.js'

/**
 * A body refused after it arrived whole (400) keeps its connection (markClosingAnswer),
 * so what was pipelined behind it is answered in turn. But an unsupported Expect pipelined in the
 * same packet is read (checkExpectation) before the 400 is sent, and its 417 now marks the
 * connection closing: markClosingAnswer then skips the 400 (isClosing), which keeps Fastify's
 * `Connection: close`, and Node ends the connection after the 400: the 417 is never written.
 */
const malformedJson = 'POST /auth/session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1\r\n\r\n{'

for (const [what, second, statusBehind] of [
  ['a 417 (an unsupported Expect)', 'GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: something-else\r\n\r\n', 417],
  ['a GET (control)', 'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n', 200]
] as const) {
  t.test(`${what} pipelined behind a malformed JSON body is answered after its 400`, async (t) => {
    const { port } = await cancelOnSocket(t)
    const { received } = await exchange(port, malformedJson + second)
    t.same(statuses(received), [400, statusBehind], `the 400, then the ${statusBehind}`)
  })
}

import t from 'tap'
import { cancelOnSocket, exchange, statuses } from './support.js'

/**
 * Fastify answers a body it cannot take (not JSON: 400, another media type: 415, too large: 413)
 * with `Connection: close`, in case more of it comes. Node hands a request pipelined behind it to
 * its route as soon as it is read, while the first one's body is still being parsed: a cancel
 * pipelined there reached Care360 and its client was never told (found by a smuggling review).
 * Now a request that arrived whole keeps its connection, and what was pipelined behind it is
 * answered in turn; one whose body is still arriving closes it, before anything behind is read.
 * The 417 of an unsupported Expect is decided at the headers: nothing behind it runs.
 */
const cancel = (id: string, token: string, body: string): string =>
  `POST /appointments/${id}/cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n` +
  `Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`

const refusals: Array<[string, number, (id: string, token: string) => string]> = [
  ['a body that is not JSON', 400, () => 'POST /auth/session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1\r\n\r\n{'],
  ['a body of another media type', 415, () => 'POST /auth/session HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 1\r\n\r\n{'],
  ['a body too large, whole', 413, (id, token) => `POST /appointments/${id}/cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\nContent-Type: application/json\r\nContent-Length: 9000\r\n\r\n${'{'.repeat(9000)}`],
  ['a body too large, still arriving', 413, (id, token) => `POST /appointments/${id}/cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\nContent-Type: application/json\r\nContent-Length: 90000\r\n\r\n{`],
  ['an unsupported Expect', 417, () => 'GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: something-else\r\n\r\n']
]

for (const [what, status, first] of refusals) {
  t.test(`a cancel pipelined behind the ${status} of ${what} is answered if it runs`, async (t) => {
    const { port, sandbox, token, id, body } = await cancelOnSocket(t)
    const { received, closed } = await exchange(port, first(id, token) + cancel(id, token, body))
    await new Promise((resolve) => setTimeout(resolve, 300))
    const ran = sandbox.control.calls.filter((call) => call.method === 'POST').length
    t.ok(ran <= 1, 'at most one cancel reached the upstream')
    if (ran === 1) {
      // The refusal decided once the first request had arrived whole.
      t.same(statuses(received), [status, 200], `the ${status}, then the cancel's own answer`)
      t.notOk(closed, 'the connection stays open')
    } else {
      // The refusal decided while the first request was still arriving: nothing behind it read.
      t.same(statuses(received), [status], `one answer, the ${status}`)
      t.ok(closed, 'the connection is closed')
      t.notOk(sandbox.control.isCancelled(id), 'the appointment is not cancelled')
    }
    // A JSON body is parsed once it has all arrived; the 417 is decided at the headers, and a
    // declared length over the limit before the body is read.
    if (status === 400) t.equal(ran, 1, 'the malformed JSON is refused after the body arrived: the cancel runs, answered')
    if (status === 417 || what.endsWith('still arriving')) t.equal(ran, 0, 'nothing behind it runs')
  })
}

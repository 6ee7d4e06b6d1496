import t from 'tap'
import { cancelOnSocket, exchange, statuses } from './support.js'

/**
 * Node before 22.23.2 and 24.18.1 (CVE-2026-58044; Node 20 has no fix) dropped the header fields
 * past maxHeadersCount (1000 by default) from the request while its parser still framed the body
 * by them. A Transfer-Encoding hidden there escaped the refusal of Transfer-Encoding in HTTP/1.0,
 * and the request pipelined behind the body it framed ran. A patched Node answers 431; the service
 * answers the same on the others (answers.ts, earlyRefusal). CI runs this on Node 24 and Node 20.
 */
const fields = (count: number): string => 'a:\r\n'.repeat(count)

t.test('a request with 1000 header fields or more is refused, and nothing behind it runs', async (t) => {
  const { port, sandbox, token } = await cancelOnSocket(t)
  const behind = `GET /appointments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n\r\n`
  const hidden = `POST /healthz HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n${fields(2000)}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n`
  const { received, closed } = await exchange(port, hidden + behind)
  t.same(statuses(received), [431], 'one answer, the 431')
  t.match(received, /"code":"VALIDATION_FAILED"/, 'in the envelope')
  t.ok(closed, 'the connection is closed')
  await new Promise((resolve) => setTimeout(resolve, 300))
  t.equal(sandbox.control.calls.length, 0, 'the request behind it never reached the upstream')

  // The same limit on every Node: 1000 fields (Host, Connection and 998 more) are refused.
  t.same(statuses((await exchange(port, `GET /healthz HTTP/1.1\r\nHost: x\r\n${fields(998)}Connection: close\r\n\r\n`)).received), [431], '1000 fields: 431')
  t.same(statuses((await exchange(port, `GET /healthz HTTP/1.1\r\nHost: x\r\n${fields(997)}Connection: close\r\n\r\n`)).received), [200], '999 fields: served')
})

import t, { type Test } from 'tap'
import { createServer, type AddressInfo, type Socket } from 'node:net'
import { once } from 'node:events'
import { buildTestApp, signIn } from '../helpers/app.js'

/**
 * A Known limit (README), pinned: RFC 9110 15.2 says a client "MUST be able to parse one or more
 * 1xx responses received prior to a final response, even if the client does not expect one". A
 * 102 or a 103 before the answer is read (client.test.ts); a 100 (Continue) that the upstream, or
 * a proxy on its path, sends although no `Expect: 100-continue` went is not: undici destroys the
 * connection ("bad response", lib/dispatcher/client-h1.js, `statusCode === 100`) and offers no
 * option to ignore it. The answers are still the contract's (a lost connection, 502), in time,
 * and a cancel's outcome is told as unknown (an Idempotency-Key retry resolves it). When undici
 * learns to skip the 100, this test fails: then the list is read and the cancel answered 200.
 * (Found by test/care360/answer-fuzz.test.ts.)
 */

const ID = '5d0c2c44-7f0e-4b8f-9a51-2a0f1c3e9b10'

function json (status: number, body: unknown): string {
  const text = JSON.stringify(body)
  return `HTTP/1.1 ${status} OK\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(text)}\r\nconnection: close\r\n\r\n${text}`
}

async function upstreamSending100 (t: Test, before: { list: boolean, cancel: boolean }): Promise<{ url: string, lists: () => number, cancels: () => number }> {
  let lists = 0
  let cancels = 0
  const sockets = new Set<Socket>()
  const server = createServer((socket) => {
    sockets.add(socket)
    socket.on('error', () => {})
    let head = ''
    socket.on('data', (chunk: Buffer) => {
      head += chunk.toString('latin1')
      if (!head.includes('\r\n\r\n')) return
      const post = head.startsWith('POST')
      // The whole POST body first (the cancel's is small: one more chunk at most).
      if (post && !/\}$/.test(head)) return
      if (post) cancels++
      else lists++
      const prelude = (post ? before.cancel : before.list) ? 'HTTP/1.1 100 Continue\r\n\r\n' : ''
      socket.end(prelude + (post
        ? json(200, { status: 200, success: true, message: 'Meeting cancelled successfully' })
        : json(200, { status: 200, success: true, message: 'Appointments fetched successfully', data: [{ id: ID, end: '2099-01-01T00:00:00Z' }] })))
    })
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.teardown(() => {
    for (const socket of sockets) socket.destroy()
    server.close()
  })
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, lists: () => lists, cancels: () => cancels }
}

t.test('a 100 (Continue) before the list: the connection is lost, the list sent again, then 502', async (t) => {
  const upstream = await upstreamSending100(t, { list: true, cancel: false })
  const { app, issuer } = await buildTestApp(t, { upstreamUrl: upstream.url })
  const token = await signIn(app, issuer, 'continue-list@example.com')
  const list = await app.inject({ url: '/appointments', headers: { authorization: `Bearer ${token}` } })
  t.equal(list.statusCode, 502, list.body)
  t.same(list.json(), { status: 502, success: false, message: 'The connection to the appointment service was lost', code: 'UPSTREAM_ERROR' })
  t.equal(upstream.lists(), 2, 'a read is sent once more on a fresh connection')
})

t.test('a 100 (Continue) before the cancel\'s 200: 502, the outcome told as unknown, sent once', async (t) => {
  const upstream = await upstreamSending100(t, { list: false, cancel: true })
  const { app, issuer } = await buildTestApp(t, { upstreamUrl: upstream.url })
  const token = await signIn(app, issuer, 'continue-cancel@example.com')
  const cancel = await app.inject({ method: 'POST', url: `/appointments/${ID}/cancel`, headers: { authorization: `Bearer ${token}` } })
  t.equal(upstream.cancels(), 1, 'the upstream got the cancel once, and applied it')
  t.equal(cancel.statusCode, 502, cancel.body)
  t.equal(cancel.json().code, 'UPSTREAM_ERROR')
  t.match(cancel.json().message, /whether the change was applied is unknown/)
})

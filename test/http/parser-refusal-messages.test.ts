import t, { type Test } from 'tap'
import { buildTestApp } from '../helpers/app.js'
import { buildMetricsServer } from '../../src/metrics.js'
import { parseRawAnswer } from '../fault/support.js'
import { exchange } from './support.js'

/**
 * The HTTP parser's refusals are written on the socket (answers.ts, answerParserError), each in
 * the envelope with the message of its status: a malformed request's 400 says so, and headers
 * too large get 431 with theirs (a 408's 'Request timed out' comes from the same choice; it is
 * read in test/abuse/slow-readers.test.ts). The metrics listener answers its refusals the same way.
 */
const cases: Array<[string, string, number, string]> = [
  ['a malformed header field', 'GET /healthz HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n', 400, 'Malformed request'],
  ['headers too large', `GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: ${'a'.repeat(20_000)}\r\n\r\n`, 431, 'Request headers are too large']
]

async function checkMessages (t: Test, port: number): Promise<void> {
  for (const [name, text, status, message] of cases) {
    const answer = parseRawAnswer((await exchange(port, text)).received)
    t.equal(answer?.status, status, `${name}: ${status}`)
    t.has(JSON.parse(answer?.body ?? '{}'), { status, success: false, code: 'VALIDATION_FAILED', message }, `${name}: its message`)
  }
}

t.test('the HTTP parser\'s 400 and 431 each carry their own message', async (t) => {
  const { app } = await buildTestApp(t, { env: { RATE_LIMIT_IP: '100000/1m' } })
  await app.listen({ host: '127.0.0.1', port: 0 })
  await checkMessages(t, (app.server.address() as { port: number }).port)
})

t.test('the metrics listener\'s 400 and 431 carry the same messages', async (t) => {
  const { app } = await buildTestApp(t)
  const server = buildMetricsServer(app.metrics.registry)
  t.teardown(() => server.close())
  await server.listen({ host: '127.0.0.1', port: 0 })
  await checkMessages(t, (server.server.address() as { port: number }).port)
})

import t from 'tap'
import { buildTestApp } from '../helpers/app.js'
import { parseRawAnswer } from '../fault/support.js'
import { exchange } from './support.js'

/**
 * The answers given before routing (the HTTP parser's 400/408/431, a CONNECT's 400, an Expect's
 * 417, Fastify's malformed URL or over-long parameter, the Host checks) are in the envelope with
 * x-request-id and no-store, and also carry what they once lacked:
 * - a `Date`, also those written on the socket itself (parser errors, CONNECT): RFC 9110 6.6.1,
 *   "An origin server with a clock MUST generate a Date header field in all 2xx, 3xx, and 4xx
 *   responses";
 * - the security headers the README puts "on every answer" (CSP, nosniff, HSTS, X-Frame-Options,
 *   Referrer-Policy, CORP), which the onRequest hook that adds them never reaches for these
 *   answers: each writes them itself (SECURITY_HEADERS).
 */
t.test('answers refused before routing carry Date and the security headers of every answer', async (t) => {
  const { app } = await buildTestApp(t, { env: { RATE_LIMIT_IP: '100000/1m' } })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const port = (app.server.address() as { port: number }).port
  const requests: Record<string, string> = {
    'malformed header (parser 400)': 'GET /healthz HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n',
    'headers too large (parser 431)': `GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: ${'a'.repeat(20_000)}\r\n\r\n`,
    'CONNECT (400)': 'CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n',
    'unsupported Expect (417)': 'GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: foo\r\nConnection: close\r\n\r\n',
    'malformed URL (400)': 'GET /% HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
    'parameter too long (400)': `POST /appointments/${'a'.repeat(300)}/cancel HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`,
    'no Host (400)': 'GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n',
    'two Hosts (400)': 'GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n'
  }
  for (const [name, text] of Object.entries(requests)) {
    const answer = parseRawAnswer((await exchange(port, text)).received)
    if (answer === null) { t.fail(`${name}: no answer`); continue }
    t.ok(answer.status >= 400 && answer.status < 500, `${name}: a 4xx (${answer.status})`)
    t.equal(answer.headers['cache-control'], 'no-store', `${name}: no-store (as today)`)
    t.ok(!Number.isNaN(Date.parse(answer.headers.date ?? '')), `${name}: Date (RFC 9110 6.6.1)`)
    t.equal(answer.headers['x-content-type-options'], 'nosniff', `${name}: nosniff`)
    t.match(String(answer.headers['content-security-policy']), /default-src 'none'/, `${name}: CSP`)
    t.match(String(answer.headers['strict-transport-security']), /^max-age=31536000/, `${name}: HSTS`)
    t.equal(answer.headers['x-frame-options'], 'DENY', `${name}: X-Frame-Options`)
    t.equal(answer.headers['referrer-policy'], 'no-referrer', `${name}: Referrer-Policy`)
    t.equal(answer.headers['cross-origin-resource-policy'], 'same-origin', `${name}: CORP`)
  }
})

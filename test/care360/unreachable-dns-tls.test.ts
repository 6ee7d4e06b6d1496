import { spawnSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { createServer as createHttpsServer } from 'node:https'
import { createServer as createHttpServer } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { ErrorCode } from '../../src/errors.js'
import { createCare360Client } from '../../src/care360/client.js'
import { buildTestApp, signIn } from '../helpers/app.js'
import { listenOnLoopback } from '../helpers/ports.js'
import { failureOf } from './support.js'

/**
 * The contract's row "upstream unreachable (refused, DNS, TLS: the request was never sent) → 502
 * UPSTREAM_UNAVAILABLE". Refused connections and stalled handshakes were in the suite; a handshake
 * that fails (a certificate the service does not trust, no TLS at all on the port) and a name
 * that does not resolve were not.
 */

const KEY = 'unreachable-test-org-key'
const EMAIL = 'alice@example.com'
const ID = '3f0b5d2e-8a41-4c1e-9f27-1a6d3c8e5b01'

const hasOpenssl = spawnSync('openssl', ['version']).status === 0

/** A self-signed certificate for 127.0.0.1, made for this run: no CA the service trusts signed it. */
function selfSigned (t: Test): { key: Buffer, cert: Buffer } {
  const dir = mkdtempSync(join(tmpdir(), 'bff-tls-'))
  t.teardown(() => { rmSync(dir, { recursive: true, force: true }) })
  const made = spawnSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'), '-days', '1', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1'])
  if (made.status !== 0) throw new Error(`openssl: ${made.stderr.toString()}`)
  return { key: readFileSync(join(dir, 'key.pem')), cert: readFileSync(join(dir, 'cert.pem')) }
}

/** An upstream on loopback whose requests are counted (none may arrive); `tls` for https. */
async function upstream (t: Test, tls: { key: Buffer, cert: Buffer } | null): Promise<{ port: number, requests: () => number }> {
  let requests = 0
  const count = (_request: unknown, response: { end: (body: string) => void }): void => { requests++; response.end('{}') }
  const server = tls === null ? createHttpServer(count) : createHttpsServer(tls, count)
  return { port: await listenOnLoopback(t, server), requests: () => requests }
}

const UNAVAILABLE = { statusCode: 502, code: ErrorCode.UPSTREAM_UNAVAILABLE, outcome: 'not-sent', upstreamStatus: null }

t.test('TLS: an upstream certificate the service does not trust, and a port without TLS: 502 UPSTREAM_UNAVAILABLE, never sent', { skip: !hasOpenssl && 'no openssl to make a certificate' }, async (t) => {
  const untrusted = await upstream(t, selfSigned(t))
  const plain = await upstream(t, null)
  for (const [what, server] of [['self-signed certificate', untrusted], ['plain HTTP behind https://', plain]] as const) {
    const client = createCare360Client({ baseUrl: `https://127.0.0.1:${server.port}`, apiKey: KEY, timeoutMs: 3000 })
    t.teardown(() => client.close())
    const cancel = await failureOf(client.cancelAppointment({ email: EMAIL, appointmentId: ID, reason: 'r' }, { requestId: 'tls-1' }))
    t.match(cancel, UNAVAILABLE, `${what}: the cancel`)
    t.notMatch(cancel.message, KEY)
    t.match(await failureOf(client.fetchAppointments(EMAIL, { requestId: 'tls-2' })), UNAVAILABLE, `${what}: the list`)
    t.equal(server.requests(), 0, `${what}: no request reached the server`)
  }
})

t.test('TLS, through the app: the cancel and the list answer 502 UPSTREAM_UNAVAILABLE, and the key never leaves', { skip: !hasOpenssl && 'no openssl to make a certificate' }, async (t) => {
  const untrusted = await upstream(t, selfSigned(t))
  for (const ownership of ['on', 'off']) {
    const { app, issuer } = await buildTestApp(t, { upstreamUrl: `https://127.0.0.1:${untrusted.port}`, env: { OWNERSHIP_CHECK: ownership } })
    const token = await signIn(app, issuer, EMAIL)
    const headers = { authorization: `Bearer ${token}` }
    const cancel = await app.inject({ method: 'POST', url: `/appointments/${ID}/cancel`, headers, payload: { reason: 'r' } })
    t.equal(cancel.statusCode, 502, `OWNERSHIP_CHECK=${ownership}: cancel`)
    t.same(cancel.json(), { status: 502, success: false, message: 'The appointment service could not be reached', code: 'UPSTREAM_UNAVAILABLE' })
    const list = await app.inject({ url: '/appointments', headers })
    t.equal(list.statusCode, 502, `OWNERSHIP_CHECK=${ownership}: list`)
    t.equal(list.json().code, 'UPSTREAM_UNAVAILABLE')
  }
  t.equal(untrusted.requests(), 0, 'no request reached the server')
})

t.test('DNS: a name that does not resolve (no such name, or no answer now): 502 UPSTREAM_UNAVAILABLE, never sent', async (t) => {
  // The resolver's failure as Node's getaddrinfo reports it. A real lookup would leave loopback
  // (the system's name server), so the lookup step of the connection is the stand-in, given
  // through the client's connect options as undici passes them to net.connect.
  for (const code of ['ENOTFOUND', 'EAI_AGAIN']) {
    const looked: string[] = []
    const client = createCare360Client({
      baseUrl: 'https://care360.invalid',
      apiKey: KEY,
      timeoutMs: 3000,
      connect: {
        timeout: 1500,
        lookup (hostname: string, _options: unknown, callback: (error: Error) => void) {
          looked.push(hostname)
          callback(Object.assign(new Error(`getaddrinfo ${code} ${hostname}`), { code, errno: -3008, syscall: 'getaddrinfo', hostname }))
        }
      } as never
    })
    t.teardown(() => client.close())
    const cancel = await failureOf(client.cancelAppointment({ email: EMAIL, appointmentId: ID }, { requestId: 'dns-1' }))
    t.match(cancel, UNAVAILABLE, `${code}: the cancel`)
    t.match(cancel.cause, { code }, `${code}: the resolver's error is the cause`)
    t.match(await failureOf(client.fetchAppointments(EMAIL, { requestId: 'dns-2' })), UNAVAILABLE, `${code}: the list`)
    t.ok(looked.includes('care360.invalid'), `${code}: the name was looked up`)
  }
})

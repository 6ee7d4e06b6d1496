import { gzipSync } from 'node:zlib'
import t, { type Test } from 'tap'
import { connect } from 'node:net'
import { once } from 'node:events'
import { BODY_LIMIT_BYTES, buildApp } from '../../src/app.js'
import { loadConfig } from '../../src/config.js'
import { ApiError, ErrorCode, OwnError } from '../../src/errors.js'
import { UpstreamError } from '../../src/care360/client.js'
import { toApiError } from '../../src/plugins/answers.js'

const config = loadConfig({ CV_API_KEY: 'answers-test-key', OIDC_ISSUER: 'http://127.0.0.1:9', OIDC_CLIENT_ID: 'app', LOG_LEVEL: 'silent', METRICS_PORT: '0' })

async function app (t: Test) {
  const instance = await buildApp(config)
  instance.post('/echo', { schema: { body: { type: 'object', properties: { n: { type: 'integer' } }, required: ['n'], additionalProperties: false } } }, async (request) => ({ ok: request.body }))
  instance.get('/boom', async () => { throw new Error('secret internal detail') })
  instance.get('/teapot', async () => { throw Object.assign(new Error('odd'), { statusCode: 418 }) })
  // A library's error that carries a 500 is our failure, not a bad request.
  instance.get('/failed-500', async () => { throw Object.assign(new Error('pool exhausted'), { statusCode: 500 }) })
  instance.get('/gone', async () => { throw Object.assign(new Error('odd'), { statusCode: 404 }) })
  instance.get('/coded', async () => { throw new ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, 'Try later', { headers: { 'retry-after': '1' } }) })
  t.teardown(() => instance.close())
  await instance.ready()
  return instance
}

t.test('unknown paths answer 404 in the envelope with both headers', async (t) => {
  const server = await app(t)
  const res = await server.inject({ url: '/nope?x=1', headers: { 'x-request-id': 'abc-123' } })
  t.equal(res.statusCode, 404)
  t.same(res.json(), { status: 404, success: false, message: 'No route GET /nope', code: 'NOT_FOUND' })
  t.equal(res.headers['x-request-id'], 'abc-123')
  t.equal(res.headers['cache-control'], 'no-store')
  // Fastify parses a body before its not-found handler runs: no route is still the contract's 404.
  for (const [payload, type] of [['{"broken":', 'application/json'], [JSON.stringify({ pad: 'x'.repeat(BODY_LIMIT_BYTES) }), 'application/json'], ['plain', 'text/plain'], ['{}', 'application/json; charset=iso-8859-1']]) {
    const posted = await server.inject({ method: 'POST', url: '/nope', headers: { 'content-type': type as string }, payload })
    t.equal(posted.statusCode, 404, `a ${type} body of ${(payload as string).length} bytes to no route`)
    t.same(posted.json(), { status: 404, success: false, message: 'No route POST /nope', code: 'NOT_FOUND' })
  }
})

t.test('a malformed x-request-id is replaced by a generated one', async (t) => {
  const server = await app(t)
  for (const bad of ['has space', 'x'.repeat(129), 'semi;colon']) {
    const res = await server.inject({ url: '/healthz', headers: { 'x-request-id': bad } })
    t.match(res.headers['x-request-id'], /^[0-9a-f-]{36}$/)
  }
})

t.test("Fastify's own errors in the envelope", async (t) => {
  const server = await app(t)
  const cases: Array<[Record<string, unknown>, number, string]> = [
    [{ payload: '{"n":', headers: { 'content-type': 'application/json' } }, 400, 'VALIDATION_FAILED'],
    [{ payload: '{"__proto__":{"x":1},"n":1}', headers: { 'content-type': 'application/json' } }, 400, 'VALIDATION_FAILED'],
    [{ payload: { n: 'one' } }, 400, 'VALIDATION_FAILED'],
    [{ payload: { n: 1, extra: true } }, 400, 'VALIDATION_FAILED'],
    [{ payload: 'n=1', headers: { 'content-type': 'application/x-www-form-urlencoded' } }, 415, 'UNSUPPORTED_MEDIA_TYPE'],
    [{ payload: 'plain', headers: { 'content-type': 'text/plain' } }, 415, 'UNSUPPORTED_MEDIA_TYPE'],
    [{ payload: '{"n":1}' }, 415, 'UNSUPPORTED_MEDIA_TYPE'],
    // JSON is UTF-8: a body declared in another charset would be read wrongly, so it is refused.
    [{ payload: '{"n":1}', headers: { 'content-type': 'application/json; charset=iso-8859-1' } }, 415, 'UNSUPPORTED_MEDIA_TYPE'],
    [{ payload: '{"n":1}', headers: { 'content-type': 'application/json;Charset="UTF-16"' } }, 415, 'UNSUPPORTED_MEDIA_TYPE'],
    [{ payload: JSON.stringify({ n: 1, pad: 'x'.repeat(BODY_LIMIT_BYTES) }), headers: { 'content-type': 'application/json' } }, 413, 'PAYLOAD_TOO_LARGE'],
    // No content coding is decoded: a gzip body is refused as such, not read as broken JSON.
    [{ payload: gzipSync('{"n":1}'), headers: { 'content-type': 'application/json', 'content-encoding': 'gzip' } }, 415, 'UNSUPPORTED_MEDIA_TYPE'],
    [{ payload: '{"n":1}', headers: { 'content-type': 'application/json', 'content-encoding': 'br' } }, 415, 'UNSUPPORTED_MEDIA_TYPE']
  ]
  for (const [options, status, code] of cases) {
    const res = await server.inject({ method: 'POST', url: '/echo', ...options })
    t.equal(res.statusCode, status, code)
    t.match(res.json(), { status, success: false, code })
    t.equal(res.headers['cache-control'], 'no-store')
    t.ok(res.headers['x-request-id'])
  }
  const extra = await server.inject({ method: 'POST', url: '/echo', payload: { n: 1, extra: true } })
  t.equal(extra.json().message, 'body must not have the property "extra"')
  const ok = await server.inject({ method: 'POST', url: '/echo', payload: { n: 1 } })
  t.same(ok.json(), { ok: { n: 1 } })
  const identity = await server.inject({ method: 'POST', url: '/echo', payload: '{"n":1}', headers: { 'content-type': 'application/json', 'content-encoding': 'Identity' } })
  t.same(identity.json(), { ok: { n: 1 } }, 'the identity coding is no coding')
  const latin1 = await server.inject({ method: 'POST', url: '/echo', payload: '{"n":1}', headers: { 'content-type': 'application/json; charset=iso-8859-1' } })
  t.equal(latin1.json().message, 'Request body must be JSON in UTF-8', 'the refusal says why')
  for (const type of ['application/json; charset=utf-8', 'application/json;charset="UTF8"', 'application/json; charset=US-ASCII', 'application/json; version=1', 'application/json; charset=']) {
    const res = await server.inject({ method: 'POST', url: '/echo', payload: '{"n":1}', headers: { 'content-type': type } })
    t.same(res.json(), { ok: { n: 1 } }, `${type}: taken`)
  }
})

t.test('our bugs are a bare 500; coded errors keep status, code and headers', async (t) => {
  const server = await app(t)
  const boom = await server.inject({ url: '/boom' })
  t.equal(boom.statusCode, 500)
  t.same(boom.json(), { status: 500, success: false, message: 'Internal Server Error', code: 'INTERNAL_ERROR' })
  t.notMatch(boom.body, 'secret internal detail')
  const failed = await server.inject({ url: '/failed-500' })
  t.equal(failed.statusCode, 500, 'an error carrying statusCode 500 is a 500')
  t.same(failed.json(), { status: 500, success: false, message: 'Internal Server Error', code: 'INTERNAL_ERROR' }, 'an error carrying statusCode 500 is the bare INTERNAL_ERROR, not a client error')
  const teapot = await server.inject({ url: '/teapot' })
  t.match(teapot.json(), { status: 418, code: 'VALIDATION_FAILED' })
  const gone = await server.inject({ url: '/gone' })
  t.match(gone.json(), { status: 404, code: 'NOT_FOUND' })
  const coded = await server.inject({ url: '/coded' })
  t.equal(coded.statusCode, 503)
  t.equal(coded.headers['retry-after'], '1')
  t.match(coded.json(), { code: 'SERVICE_UNAVAILABLE', message: 'Try later' })
})

t.test('toApiError leaves unknown errors to the 500 path', async (t) => {
  t.equal(toApiError(new Error('x')), null)
  t.equal(toApiError(Object.assign(new Error('x'), { statusCode: 500 })), null, 'statusCode 500: the 500 path, not a client error')
  t.match(toApiError(Object.assign(new Error('x'), { statusCode: 499 })), { statusCode: 499, code: ErrorCode.VALIDATION_FAILED }, 'the last client status is still one')
  t.equal(toApiError(Object.assign(new Error('x'), { statusCode: 502 })), null)
  t.match(toApiError(Object.assign(new Error('x'), { validation: [] })), { statusCode: 400, message: 'Request is invalid' })
  t.match(toApiError(Object.assign(new Error('x'), { validation: [{ keyword: 'pattern', instancePath: '/id', params: {} }], validationContext: 'params' })), { message: 'params.id is not in the expected format' })
  t.match(toApiError(Object.assign(new Error('x'), { validation: [{ keyword: 'x', instancePath: '', params: {} }] })), { message: 'request is invalid' })
})

async function rawRequest (port: number, text: string): Promise<string> {
  const socket = connect(port, '127.0.0.1')
  await once(socket, 'connect')
  socket.write(text)
  let data = ''
  socket.on('data', (chunk: Buffer) => { data += chunk.toString() })
  await once(socket, 'close')
  return data
}

t.test("the HTTP parser's errors are answered in the envelope", async (t) => {
  const server = await app(t)
  await server.listen({ host: '127.0.0.1', port: 0 })
  const { port } = server.server.address() as { port: number }
  const garbage = await rawRequest(port, 'NOT HTTP AT ALL\r\n\r\n')
  t.match(garbage, /^HTTP\/1\.1 400 Bad Request/)
  t.match(garbage, /cache-control: no-store/)
  t.match(garbage, /x-request-id: [0-9a-f-]{36}/)
  t.match(garbage, /"code":"VALIDATION_FAILED"/)
  const huge = await rawRequest(port, `GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`)
  t.match(huge, /^HTTP\/1\.1 431 /)
  t.match(huge, /"status":431/)
  // Refused by Node itself unless told otherwise: a bare answer without the envelope.
  const hostless = await rawRequest(port, 'GET /healthz HTTP/1.1\r\n\r\n')
  t.match(hostless, /^HTTP\/1\.1 400 /, 'HTTP/1.1 without Host')
  t.match(hostless, /cache-control: no-store/)
  t.match(hostless, /x-request-id: [0-9a-f-]{36}/)
  t.match(hostless, /"code":"VALIDATION_FAILED"/)
  t.match(await rawRequest(port, 'GET /healthz HTTP/1.0\r\n\r\n'), /^HTTP\/1\.1 200 /, 'HTTP/1.0 needs no Host')
  // Two Host lines, whatever their case or values, in either version (RFC 9112, 3.2).
  for (const text of ['GET /healthz HTTP/1.1\r\nHost: a.example\r\nhost: b.example\r\nConnection: close\r\n\r\n', 'GET /healthz HTTP/1.0\r\nHOST: x\r\nAccept: */*\r\nHost: x\r\n\r\n']) {
    const twoHosts = await rawRequest(port, text)
    t.match(twoHosts, /^HTTP\/1\.1 400 /, 'two Host headers')
    t.match(twoHosts, /x-request-id: [0-9a-f-]{36}/)
    t.match(twoHosts, /connection: close/)
    t.match(twoHosts, /"message":"Only one Host header is allowed","code":"VALIDATION_FAILED"/)
  }
  t.match(await rawRequest(port, 'GET /healthz HTTP/1.1\r\nHost: x\r\nX-Host: y\r\nhosts: z\r\nConnection: close\r\n\r\n'), /^HTTP\/1\.1 200 /, 'one Host among names like it')
  // A Host whose value is no host (RFC 9112, 3.2: a 400), in either version.
  for (const value of ['a b', 'user@a.example', 'a.example/x', 'a, b', '[::1', 'a:80:80', 'a.example:8o']) {
    const invalid = await rawRequest(port, `GET /healthz HTTP/1.1\r\nHost: ${value}\r\nConnection: close\r\n\r\n`)
    t.match(invalid, /^HTTP\/1\.1 400 /, `Host: ${value}`)
    t.match(invalid, /connection: close/)
    t.match(invalid, /"message":"Invalid Host header","code":"VALIDATION_FAILED"/)
  }
  t.match(await rawRequest(port, 'GET /healthz HTTP/1.0\r\nHost: a b\r\n\r\n'), /^HTTP\/1\.1 400 /, 'HTTP/1.0 with an invalid Host')
  for (const value of ['', 'a.example', 'a.example:8080', 'A-b_c~1.example:', '127.0.0.1:3000', '[::1]:3000', '[v1.x]', 'xn--bcher-kva.example', 'a%2Eb']) {
    t.match(await rawRequest(port, `GET /healthz HTTP/1.1\r\nHost: ${value}\r\nConnection: close\r\n\r\n`), /^HTTP\/1\.1 200 /, `Host: ${value} is a host`)
  }
  const expectation = await rawRequest(port, 'GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: something-else\r\n\r\n')
  t.match(expectation, /^HTTP\/1\.1 417 /)
  t.match(expectation, /cache-control: no-store/)
  t.match(expectation, /x-request-id: [0-9a-f-]{36}/)
  t.match(expectation, /"status":417,"success":false/)
  // CONNECT, which Node ends without a word when nothing listens for it.
  const tunnel = await rawRequest(port, 'CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nx-request-id: connect-1\r\n\r\n')
  t.match(tunnel, /^HTTP\/1\.1 400 /)
  t.match(tunnel, /x-request-id: connect-1/)
  t.match(tunnel, /cache-control: no-store/)
  t.match(tunnel, /"status":400,"success":false,"message":"CONNECT is not served: this is no proxy","code":"VALIDATION_FAILED"/)
  // Fastify's own refusal before routing (a malformed percent-encoding in the path).
  const malformed = await server.inject({ url: '/%zz' })
  t.equal(malformed.statusCode, 400)
  t.match(malformed.json(), { code: 'VALIDATION_FAILED', message: 'Malformed request URL' })
  // An OPTIONS request for such a path (a preflight asks nothing of the path): the bare 204 of
  // any OPTIONS request, with an answer's own fields, and counted as what it was answered.
  const preflight = await server.inject({ method: 'OPTIONS', url: '/%zz' })
  t.equal(preflight.statusCode, 204)
  t.equal(preflight.headers['cache-control'], 'no-store')
  t.match(preflight.headers['x-request-id'], /^[0-9a-f-]{36}$/)
  // None of these passed a route's hooks: they are in the metrics all the same.
  const scraped = await server.metrics.registry.metrics()
  t.match(scraped, /bff_http_refused_before_routing_total\{status_code="204"\} 1\n/, 'the OPTIONS request')
  t.match(scraped, /bff_http_refused_before_routing_total\{status_code="400"\} 3\n/, 'the parser\'s 400, the CONNECT and Fastify\'s malformed URL')
  t.match(scraped, /bff_http_refused_before_routing_total\{status_code="431"\} 1\n/, 'the parser\'s 431')
  t.match(scraped, /bff_http_refused_before_routing_total\{status_code="417"\} 1\n/, 'the unsupported Expect')
})

t.test('a CONNECT\'s connection is ours to end: a reset raises nothing, a client that never ends it is let go', async (t) => {
  const server = await app(t)
  await server.listen({ host: '127.0.0.1', port: 0 })
  const { port } = server.server.address() as { port: number }
  // Node takes its own listeners off a socket it hands to `connect`: an error there with none
  // would be uncaught, and close-with-grace would end the process.
  const uncaught: string[] = []
  const listeners = process.listeners('uncaughtException')
  process.removeAllListeners('uncaughtException')
  process.on('uncaughtException', (error: NodeJS.ErrnoException) => { uncaught.push(String(error.code)) })
  t.teardown(() => {
    process.removeAllListeners('uncaughtException')
    for (const listener of listeners) process.on('uncaughtException', listener)
  })
  const reset = connect(port, '127.0.0.1')
  reset.on('error', () => {})
  await once(reset, 'connect')
  reset.write('CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n')
  await new Promise((resolve) => setTimeout(resolve, 100))
  reset.resetAndDestroy()
  // A client that reads its answer and never closes its side: the server closes the connection.
  const halfOpen = connect({ port, host: '127.0.0.1', allowHalfOpen: true })
  halfOpen.on('error', () => {})
  let answer = ''
  halfOpen.on('data', (chunk: Buffer) => { answer += chunk.toString() })
  await once(halfOpen, 'connect')
  halfOpen.write('CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n')
  await once(halfOpen, 'end')
  t.match(answer, /^HTTP\/1\.1 400 /)
  await new Promise((resolve) => setTimeout(resolve, 300))
  const open = await new Promise<number>((resolve) => { server.server.getConnections((_error, count) => { resolve(count) }) })
  t.equal(open, 0, 'no connection left on the server')
  halfOpen.destroy()
  t.same(uncaught, [], 'no uncaught exception')
})

t.test('our key refused upstream is an error line for the operator; an upstream failure a warning', async (t) => {
  const lines: Array<{ level: number, msg: string }> = []
  const instance = await buildApp({ ...config, logLevel: 'info' }, { logStream: { write (line: string) { lines.push(JSON.parse(line) as { level: number, msg: string }) } } })
  instance.get('/key-refused', async () => { throw new ApiError(502, ErrorCode.UPSTREAM_AUTH_FAILED, 'The key was refused') })
  instance.get('/upstream-down', async () => { throw new ApiError(502, ErrorCode.UPSTREAM_ERROR, 'The upstream failed') })
  t.teardown(() => instance.close())
  await instance.inject({ url: '/key-refused' })
  await instance.inject({ url: '/upstream-down' })
  t.equal(lines.find((line) => line.msg === 'The key was refused')?.level, 50, 'error')
  t.equal(lines.find((line) => line.msg === 'The upstream failed')?.level, 40, 'warn')
})

t.test('an error line names the upstream status, the outcome and the chain of causes; only our own messages', async (t) => {
  const lines: Array<{ level: number, msg: string, err?: unknown, repeats?: number }> = []
  const instance = await buildApp({ ...config, logLevel: 'info' }, { logStream: { write (line: string) { lines.push(JSON.parse(line) as { level: number, msg: string }) } } })
  const refused = Object.assign(new Error('connect ECONNREFUSED 10.0.0.7:443'), { code: 'ECONNREFUSED' })
  instance.get('/upstream', async () => {
    throw new UpstreamError(502, ErrorCode.UPSTREAM_ERROR, 'The appointment service gave an unexpected answer', { outcome: 'answered', upstreamStatus: 503, cause: new OwnError('Care360 answered HTTP 503: server error', { cause: new Error('upstream words: patient@example.com') }) })
  })
  instance.get('/idp', async () => { throw new ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, 'Identity provider unavailable', { cause: new OwnError('OIDC discovery failed', { cause: new TypeError('fetch failed', { cause: refused }) }) }) })
  t.teardown(() => instance.close())
  await instance.inject({ url: '/upstream' })
  t.same(lines.find((line) => line.msg === 'The appointment service gave an unexpected answer')?.err, {
    code: 'UPSTREAM_ERROR',
    upstreamStatus: 503,
    outcome: 'answered',
    cause: { name: 'Error', message: 'Care360 answered HTTP 503: server error', cause: { name: 'Error' } }
  }, "our own message, never another's (the upstream's words)")
  await instance.inject({ url: '/idp' })
  t.same(lines.find((line) => line.msg === 'Identity provider unavailable')?.err, {
    code: 'SERVICE_UNAVAILABLE',
    cause: { name: 'Error', message: 'OIDC discovery failed', cause: { name: 'TypeError', cause: { name: 'Error', code: 'ECONNREFUSED' } } }
  }, 'what to mend, three causes down; no address')
})

t.test('a 503 every request repeats while a store or the identity provider is down: one line a minute per message', async (t) => {
  const lines: Array<{ level: number, msg: string, repeats?: number }> = []
  const instance = await buildApp({ ...config, logLevel: 'info' }, { logStream: { write (line: string) { lines.push(JSON.parse(line) as { level: number, msg: string }) } } })
  instance.get('/sessions-down', async () => { throw new ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, 'Session store unavailable') })
  instance.get('/idp-down', async () => { throw new ApiError(503, ErrorCode.SERVICE_UNAVAILABLE, 'Identity provider unavailable') })
  instance.get('/upstream-down', async () => { throw new ApiError(502, ErrorCode.UPSTREAM_ERROR, 'The upstream failed') })
  t.teardown(() => instance.close())
  for (let i = 0; i < 20; i++) {
    t.equal((await instance.inject({ url: '/sessions-down' })).statusCode, 503)
    await instance.inject({ url: '/idp-down' })
  }
  await instance.inject({ url: '/upstream-down' })
  await instance.inject({ url: '/upstream-down' })
  const warned = (message: string): number => lines.filter((line) => line.level === 40 && line.msg === message).length
  t.equal(warned('Session store unavailable'), 1, 'one line for twenty')
  t.equal(warned('Identity provider unavailable'), 1, 'each message its own')
  t.equal(warned('The upstream failed'), 2, 'an upstream failure is one line per call (the org budget bounds them)')
  t.equal(lines.filter((line) => line.msg === 'request completed' && (line as { res?: { statusCode?: number } }).res?.statusCode === 503).length, 40, 'every one still has its access line')
})

/**
 * Sends a request's head with `Expect: 100-continue` and waits up to `waitMs` for what comes back
 * before any body; then sends `body` (if the connection is still open) and reads to the close.
 */
async function expectingContinue (port: number, head: string, body: string, waitMs = 300): Promise<{ beforeBody: string, all: string }> {
  const socket = connect(port, '127.0.0.1')
  socket.on('error', () => {})
  await once(socket, 'connect')
  let data = ''
  socket.on('data', (chunk: Buffer) => { data += chunk.toString() })
  const closed = once(socket, 'close')
  socket.write(head)
  await Promise.race([new Promise((resolve) => setTimeout(resolve, waitMs)), closed])
  const beforeBody = data
  if (!socket.destroyed && socket.writable) socket.end(body)
  await closed
  return { beforeBody, all: data }
}

t.test('Expect: 100-continue invites only a body the route takes, after its hooks passed', async (t) => {
  const server = await app(t)
  await server.listen({ host: '127.0.0.1', port: 0 })
  const { port } = server.server.address() as { port: number }
  const post = (path: string, length: number, extra = ''): string =>
    `POST ${path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${length}\r\nExpect: 100-continue\r\n${extra}Connection: close\r\n\r\n`

  const body = '{"n":1}'
  const taken = await expectingContinue(port, post('/echo', body.length), body)
  t.equal(taken.beforeBody, 'HTTP/1.1 100 Continue\r\n\r\n', 'within the limit: invited')
  t.match(taken.all, /HTTP\/1\.1 100 Continue\r\n\r\nHTTP\/1\.1 200 /)
  t.match(taken.all, /"ok":\{"n":1\}/)

  const tooLarge = await expectingContinue(port, post('/echo', BODY_LIMIT_BYTES + 1), 'x'.repeat(BODY_LIMIT_BYTES + 1))
  t.match(tooLarge.beforeBody, /^HTTP\/1\.1 413 /, 'over the limit: the 413 without an invitation')
  t.notMatch(tooLarge.all, /100 Continue/)
  t.match(tooLarge.all, /"code":"PAYLOAD_TOO_LARGE"/)

  // Refused by a hook before the body would be read: no session on the cancel.
  const cancel = await expectingContinue(port, post('/appointments/3f0b5d2e-8a41-4c1e-9f27-1a6d3c8e5b01/cancel', body.length), body)
  t.match(cancel.beforeBody, /^HTTP\/1\.1 401 /, 'no session: the 401 without an invitation')
  t.notMatch(cancel.all, /100 Continue/)

  // No route takes it (no path, or not this method): invited at once, as Node would, since Fastify
  // reads the body before its 404 (not inviting it held both sides until the client gave up).
  for (const path of ['/nowhere', '/healthz']) {
    const nowhere = await expectingContinue(port, post(path, body.length), body, 2000)
    t.equal(nowhere.beforeBody, 'HTTP/1.1 100 Continue\r\n\r\n', `${path}: invited at once`)
    t.match(nowhere.all, /^HTTP\/1\.1 100 Continue\r\n\r\nHTTP\/1\.1 404 /)
  }
  // A URL Fastify refuses before routing: its 400 at once, the body not invited.
  const malformed = await expectingContinue(port, post('/%zz', body.length), body, 2000)
  t.match(malformed.beforeBody, /^HTTP\/1\.1 400 /)
  t.notMatch(malformed.all, /100 Continue/)

  // A chunked body is invited, and held to the limit as it arrives.
  const chunked = await expectingContinue(port, 'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n', `${body.length.toString(16)}\r\n${body}\r\n0\r\n\r\n`)
  t.equal(chunked.beforeBody, 'HTTP/1.1 100 Continue\r\n\r\n')
  t.match(chunked.all, /HTTP\/1\.1 200 /)

  // The mobile sign-in takes an ID token longer than the JSON limit: invited by its own limit.
  const idToken = JSON.stringify({ idToken: 'a'.repeat(BODY_LIMIT_BYTES + 100) })
  const signIn = await expectingContinue(port, post('/auth/session', idToken.length), idToken)
  t.equal(signIn.beforeBody, 'HTTP/1.1 100 Continue\r\n\r\n', 'a body within its route\'s own limit')
  t.match(signIn.all, /HTTP\/1\.1 100 Continue\r\n\r\nHTTP\/1\.1 401 /)
})

t.test('Fastify\'s refusals before routing: a path parameter up to 256 characters reaches its route, and each refusal has its access line with the code', async (t) => {
  const lines: Array<{ msg?: string, code?: string, res?: { statusCode?: number } }> = []
  const server = await buildApp(loadConfig({ CV_API_KEY: 'answers-test-key', OIDC_ISSUER: 'http://127.0.0.1:9', OIDC_CLIENT_ID: 'app', LOG_LEVEL: 'info', METRICS_PORT: '0' }), {
    logStream: { write (line: string) { lines.push(JSON.parse(line)) } }
  })
  t.teardown(() => server.close())
  await server.ready()
  const at256 = await server.inject({ method: 'POST', url: `/appointments/${'a'.repeat(256)}/cancel` })
  t.not(at256.json().message, 'A path parameter is too long', '256 characters: the route\'s own checks answer')
  const at257 = await server.inject({ method: 'POST', url: `/appointments/${'a'.repeat(257)}/cancel` })
  t.match(at257.json(), { code: 'VALIDATION_FAILED', message: 'A path parameter is too long' }, '257: refused before routing')
  await server.inject({ url: '/%zz' })
  const refused = lines.filter((line) => line.msg === 'request refused before routing')
  t.same(refused.map((line) => [line.code, line.res?.statusCode]), [['VALIDATION_FAILED', 400], ['VALIDATION_FAILED', 400]], 'one access line each, with its code')
})

import t from 'tap'
import { connect } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { buildTestApp, signIn } from '../helpers/app.js'
import { SANDBOX_KEY, startSandbox } from '../helpers/sandbox.js'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'
import { call, captureLogs, offContract, outcome, parseRawAnswer as parse, scanLogs } from '../fault/support.js'

/**
 * Abuse on real sockets, against the app listening on loopback with its production timeouts
 * (headers 5 s, whole request 10 s): oversized headers and bodies, malformed requests, and slow
 * clients, which the server must cut off in time, answering 408 in the envelope.
 */

const alice = DEMO_PATIENTS[0]!
const owned = alice.appointments[0]!

interface RawResult { data: string, closedAfterMs: number | null }

/**
 * Writes `chunks` one by one, `everyMs` apart, on a raw connection; resolves when the server
 * closes it (or after `giveUpMs`, with `closedAfterMs: null`).
 */
function raw (port: number, chunks: readonly string[], everyMs: number, giveUpMs: number): Promise<RawResult> {
  return new Promise((resolve) => {
    const started = Date.now()
    const socket = connect(port, '127.0.0.1')
    let data = ''
    let i = 0
    let done = false
    const writer = setInterval(() => {
      if (i < chunks.length && !socket.destroyed && socket.writable) socket.write(chunks[i++] as string)
    }, everyMs)
    const finish = (closedAfterMs: number | null): void => {
      if (done) return
      done = true
      clearInterval(writer)
      clearTimeout(giveUp)
      socket.destroy()
      resolve({ data, closedAfterMs })
    }
    const giveUp = setTimeout(() => finish(null), giveUpMs)
    socket.on('data', (chunk: Buffer) => { data += chunk.toString('latin1') })
    socket.on('error', () => {})
    socket.on('close', () => finish(Date.now() - started))
    socket.on('end', () => finish(Date.now() - started))
  })
}

/** The answer in a raw exchange, parsed enough for the contract's checks. */
t.test('abuse on real sockets', async (t) => {
  const { lines, stream } = captureLogs()
  const sandbox = await startSandbox(t)
  const { app, issuer } = await buildTestApp(t, {
    upstreamUrl: sandbox.url,
    logStream: stream,
    env: { CV_API_KEY: SANDBOX_KEY, RATE_LIMIT_IP: '100000/1m', RATE_LIMIT_SESSION: '100000/1m' }
  })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const port = (app.server.address() as { port: number }).port
  const origin = `http://127.0.0.1:${port}`
  const token = await signIn(app, issuer, alice.email)
  const auth = { authorization: `Bearer ${token}` }
  const reason = 'Private socket abuse reason'

  // Slow clients run for seconds: start them first, check the rest meanwhile.
  const headerBytes = `GET /appointments HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${token}\r\nx-slow: ${'a'.repeat(200)}\r\n\r\n`.split('')
  const slowHeaders = raw(port, headerBytes, 100, 14_000)
  const silent = raw(port, [], 1000, 14_000)
  const body = JSON.stringify({ reason })
  const slowBody = raw(port, [
    `POST /appointments/${owned.id}/cancel HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${token}\r\nx-request-id: slow-body-1\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n`,
    ...body.split('')
  ], 400, 14_000)
  const startedAt = Date.now()

  await t.test('oversized headers: 431 in the envelope', async (t) => {
    for (const headers of [{ 'x-big': 'a'.repeat(20 * 1024) }, Object.fromEntries(Array.from({ length: 400 }, (_, i) => [`x-h${i}`, 'b'.repeat(60)])), { cookie: `a=${'c'.repeat(17 * 1024)}`, ...auth }]) {
      const answer = await call(origin, { path: '/appointments', headers, timeoutMs: 3000 })
      t.equal(outcome(answer), '431 VALIDATION_FAILED')
      t.equal(offContract(answer), null, 'in the envelope, with x-request-id and cache-control')
    }
  })

  await t.test('oversized bodies: 413 in the envelope, no upstream call', async (t) => {
    const before = sandbox.control.calls.length
    const big = JSON.stringify({ reason: 'x'.repeat(10_000) })
    const cancel = `/appointments/${owned.id}/cancel`
    const cases: Array<[string, Record<string, string>, string]> = [
      [cancel, { ...auth, 'content-type': 'application/json' }, big],
      [cancel, { ...auth, 'content-type': 'application/json', 'transfer-encoding': 'chunked' }, big],
      ['/auth/session', { 'content-type': 'application/json' }, JSON.stringify({ idToken: 'x'.repeat(64 * 1024) })]
    ]
    for (const [path, headers, payload] of cases) {
      const answer = await call(origin, { method: 'POST', path, headers, body: payload, timeoutMs: 3000 })
      t.equal(outcome(answer), '413 PAYLOAD_TOO_LARGE', `${path} ${headers['transfer-encoding'] ?? 'content-length'}`)
      t.equal(offContract(answer), null)
    }
    // A huge declared length is refused from the header alone, before any body arrives.
    const declared = await raw(port, [`POST ${cancel} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${token}\r\ncontent-type: application/json\r\ncontent-length: 1000000000\r\n\r\n{`], 10, 3000)
    const answer = parse(declared.data)
    t.equal(answer === null ? null : outcome(answer), '413 PAYLOAD_TOO_LARGE', 'a declared gigabyte is refused at once')
    t.equal(sandbox.control.calls.length, before, 'nothing reached the upstream')
  })

  await t.test('malformed requests: 400 in the envelope, with x-request-id', async (t) => {
    for (const text of ['GARBAGE\r\n\r\n', 'GET / HTTP/9.9\r\n\r\n', 'GET /healthz HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n', 'GET /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n', 'GET /\x00 HTTP/1.1\r\n\r\n']) {
      const result = await raw(port, [text], 10, 3000)
      const answer = parse(result.data)
      t.ok(answer !== null, `${JSON.stringify(text.slice(0, 30))} is answered`)
      if (answer !== null) {
        t.equal(outcome(answer), '400 VALIDATION_FAILED', JSON.stringify(text.slice(0, 30)))
        t.equal(offContract(answer), null)
      }
      t.ok(result.closedAfterMs !== null, 'and the connection is closed')
    }
  })

  await t.test('parser errors around requests: one answer per request, in order, each with its own id', async (t) => {
    const statuses = (text: string): string[] => [...text.matchAll(/HTTP\/1\.1 (\d{3})/g)].map((match) => match[1] as string)
    const chunked = (path: string, id: string, headers: string): string =>
      `POST ${path} HTTP/1.1\r\nhost: x\r\nx-request-id: ${id}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n${headers}\r\n2\r\n{}\r\n`

    // A broken chunk in the body of the request being served: its 400, with its own id.
    const served = await raw(port, [chunked('/auth/session', 'broken-body-1', ''), 'ZZ\r\n'], 150, 3000)
    t.same(statuses(served.data), ['400'], 'one answer')
    t.equal(parse(served.data)?.headers['x-request-id'], 'broken-body-1', 'with the caller\'s request id')
    t.equal(parse(served.data) === null ? null : offContract(parse(served.data)!), null, 'in the envelope')

    // A request refused before its body arrived (no session: 401), then a broken chunk of that
    // body: the 401 was its answer, and nothing more is written on the connection.
    const refused = await raw(port, [chunked(`/appointments/${owned.id}/cancel`, 'early-401', ''), 'ZZ\r\n'], 150, 3000)
    t.same(statuses(refused.data), ['401'], 'the early answer only')
    t.equal(parse(refused.data)?.headers['x-request-id'], 'early-401')
    t.ok(refused.closedAfterMs !== null, 'and the connection is closed')

    // Garbage pipelined behind a request that waits for the upstream: that request's answer
    // first, then the 400.
    const pipelined = await raw(port, [`GET /appointments HTTP/1.1\r\nhost: x\r\nx-request-id: first-in-line\r\nauthorization: Bearer ${token}\r\n\r\nGARBAGE\r\n\r\n`], 10, 3000)
    t.same(statuses(pipelined.data), ['200', '400'], 'both answered, in order')
    t.equal(parse(pipelined.data)?.headers['x-request-id'], 'first-in-line', 'the first answer is the request\'s own')
    t.ok(pipelined.closedAfterMs !== null, 'and the connection is closed')

    // The same behind a slow answer, with more garbage meanwhile (the parser reports it again) and
    // a broken body of a second request: one 400, with that request's id.
    const first = `GET /appointments HTTP/1.1\r\nhost: x\r\nx-request-id: first-in-line\r\nauthorization: Bearer ${token}\r\n`
    sandbox.control.setFailure({ kind: 'slow', delayMs: 300, endpoint: 'list', times: 1 })
    const behindSlow = await raw(port, [`${first}\r\n${chunked('/auth/session', 'second-in-line', '')}ZZ\r\n`, 'MORE\r\n\r\n'], 100, 3000)
    t.same(statuses(behindSlow.data), ['200', '400'], 'behind a slow answer: both answered, in order')
    t.equal(parse(behindSlow.data.slice(behindSlow.data.lastIndexOf('HTTP/1.1')))?.headers['x-request-id'], 'second-in-line', 'the 400 is the second request\'s')

    // Behind two requests, the second answered after the first (it waits for its own upstream
    // calls): both answers, in order, then the 400.
    sandbox.control.setFailure({ kind: 'slow', delayMs: 300, endpoint: 'any', times: 2 })
    const cancelBody = JSON.stringify({ reason })
    const second = `POST /appointments/${(alice.appointments[1] as { id: string }).id}/cancel HTTP/1.1\r\nhost: x\r\nx-request-id: second-in-line\r\nauthorization: Bearer ${token}\r\ncontent-type: application/json\r\ncontent-length: ${cancelBody.length}\r\n\r\n${cancelBody}`
    const behindTwo = await raw(port, [`${first}\r\n${second}GARBAGE\r\n\r\n`], 10, 3000)
    t.same(statuses(behindTwo.data), ['200', '200', '400'], 'behind two requests: all answered, in order')
    t.same([...behindTwo.data.matchAll(/x-request-id: ([^\r]*)/g)].map((match) => match[1]).slice(0, 2), ['first-in-line', 'second-in-line'])

    // Behind a slow request, one refused before its body arrived (no session: 401), then a broken
    // chunk of that body: the two answers, and nothing more.
    sandbox.control.setFailure({ kind: 'slow', delayMs: 300, endpoint: 'list', times: 1 })
    const refusedBehind = await raw(port, [`${first}\r\n${chunked(`/appointments/${owned.id}/cancel`, 'early-401', '')}`, 'ZZ\r\n'], 100, 3000)
    t.same(statuses(refusedBehind.data), ['200', '401'], 'behind a slow answer, a refused request gets its own answer only')
    t.ok(refusedBehind.closedAfterMs !== null, 'and the connection is closed')

    // A first request that closes its connection: nothing is written after its answer.
    const closing = await raw(port, [`${first}connection: close\r\n\r\nGARBAGE\r\n\r\n`], 10, 3000)
    t.same(statuses(closing.data), ['200'], 'a connection the first request closes gets nothing more')

    // A client that leaves before the first answer: its connection is let go, the server serves on.
    sandbox.control.setFailure({ kind: 'slow', delayMs: 300, endpoint: 'list', times: 1 })
    const left = await raw(port, [`${first}\r\nGARBAGE\r\n\r\n`], 10, 100)
    t.equal(left.data, '', 'the client left unanswered')
    await new Promise((resolve) => setTimeout(resolve, 400))
    t.equal((await call(origin, { path: '/healthz', timeoutMs: 2000 })).status, 200, 'and the server serves on')
  })

  await t.test('a malformed URL or an over-long parameter: an answer of the table, in the envelope', async (t) => {
    for (const path of ['/%zz', '/appointments/%/cancel', '/auth/me%', `/appointments/${'x'.repeat(300)}/cancel`, `/appointments/${'%41'.repeat(100)}/cancel`]) {
      for (const headers of [{}, auth]) {
        const answer = await call(origin, { method: path.includes('cancel') ? 'POST' : 'GET', path, headers: { ...headers, 'x-request-id': 'bad-url-1' }, timeoutMs: 3000 })
        t.ok(answer.status >= 400 && answer.status < 500, `${path.slice(0, 40)}: ${outcome(answer)}`)
        t.equal(offContract(answer), null, `${path.slice(0, 40)} in the envelope`)
        t.equal(answer.headers['x-request-id'], 'bad-url-1', 'with the caller\'s request id')
      }
    }
  })

  await t.test('a request target that is not a path (`*appointments`) reaches no route, with a session or not', async (t) => {
    // Node's parser lets `*` start a request target (asterisk-form is `OPTIONS *`); find-my-way
    // before 9.10.2 then dropped that first character and routed `*appointments` as
    // `/appointments`, past any rule of a proxy or WAF in front that matches paths by prefix.
    const before = sandbox.control.calls.length
    const targets: Array<[string, string]> = [['GET', '*appointments'], ['POST', `*appointments/${owned.id}/cancel`], ['GET', '*auth/me'], ['GET', '*healthz'], ['GET', '*readyz']]
    for (const [method, target] of targets) {
      const result = await raw(port, [`${method} ${target} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${token}\r\nx-request-id: star-1\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}`], 10, 3000)
      const answer = parse(result.data)
      t.equal(answer === null ? null : outcome(answer), '400 VALIDATION_FAILED', `${method} ${target}`)
      if (answer !== null) t.equal(offContract(answer), null, 'in the envelope')
      t.equal(answer?.headers['x-request-id'], 'star-1', 'with the caller\'s request id')
    }
    t.equal(sandbox.control.calls.length, before, 'nothing reached the upstream')
  })

  await t.test('a fragment in the request target (`/appointments#x`) is refused, the connection kept', async (t) => {
    const before = sandbox.control.calls.length
    for (const [method, target] of [['GET', '/appointments#x'], ['POST', `/appointments/${owned.id}/cancel#x`], ['GET', '/healthz#x'], ['GET', 'http://x/appointments#x']]) {
      const result = await raw(port, [`${method} ${target} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${token}\r\nx-request-id: fragment-1\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n`], 10, 3000)
      t.same([...result.data.matchAll(/HTTP\/1\.1 (\d{3}) /g)].map((match) => match[1]), ['400', '200'], `${method} ${target}: refused, and the request behind it answered`)
      const answer = parse(result.data.slice(0, result.data.indexOf('HTTP/1.1 ', 1)))
      t.equal(answer === null ? null : outcome(answer), '400 VALIDATION_FAILED')
      if (answer !== null) t.equal(offContract(answer), null, 'in the envelope')
      t.equal(answer?.headers['x-request-id'], 'fragment-1')
    }
    t.equal(sandbox.control.calls.length, before, 'nothing reached the upstream')
  })

  await t.test('an absolute-form target runs its path\'s route, and is logged by that path, never with its userinfo', async (t) => {
    const answer = await raw(port, [`GET http://patient:userinfo-secret@x/appointments HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${token}\r\nx-request-id: absolute-1\r\nconnection: close\r\n\r\n`], 10, 3000)
    t.equal(parse(answer.data)?.status, 200, 'RFC 9112, 3.2.2: a server accepts the absolute-form')
    const line = lines.find((text) => text.includes('"reqId":"absolute-1"') && text.includes('"statusCode"'))
    t.match(line, /"url":"\/appointments"/)
    t.notMatch(lines.join('\n'), /userinfo-secret/, 'the userinfo is in no log line')
  })

  await t.test('slow clients are cut off by the server\'s timeouts', async (t) => {
    // Meanwhile the server serves everyone else.
    const health = await call(origin, { path: '/healthz', timeoutMs: 2000 })
    t.equal(health.status, 200, 'others are served while slow clients hold sockets')

    const [headers, quiet, bodyResult] = await Promise.all([slowHeaders, silent, slowBody])
    const cases: Array<[string, RawResult, number]> = [
      ['headers sent a byte at a time (headersTimeout 5 s)', headers, 5000],
      ['a connection that says nothing (headersTimeout 5 s)', quiet, 5000],
      ['a body sent a byte at a time (requestTimeout 10 s)', bodyResult, 10_000]
    ]
    for (const [what, result, timeoutMs] of cases) {
      t.ok(result.closedAfterMs !== null, `${what}: cut off`)
      if (result.closedAfterMs !== null) {
        // Node checks the deadlines periodically: allow one check interval and some slack.
        t.ok(result.closedAfterMs >= timeoutMs - 200 && result.closedAfterMs <= timeoutMs + 2500, `${what}: after ${result.closedAfterMs} ms`)
      }
      const answer = parse(result.data)
      // Answered, not only cut off: also a request whose body was still arriving (it has a
      // response object, which the server had not begun to write).
      t.not(answer, null, `${what}: answered`)
      if (answer !== null) {
        t.equal(outcome(answer), '408 VALIDATION_FAILED', `${what}: 408`)
        t.equal((JSON.parse(answer.body) as { message?: unknown }).message, 'Request timed out', `${what}: its message`)
        t.equal(offContract(answer), null, `${what}: in the envelope`)
      }
    }
    // The request whose body was late had its headers, the caller's request id among them.
    t.equal(parse(bodyResult.data)?.headers['x-request-id'], 'slow-body-1', 'the 408 of a request carries its request id')
    t.notOk(sandbox.control.isCancelled(owned.id), 'the slow cancel never ran')
    t.ok(Date.now() - startedAt < 15_000, 'within the suite\'s bound')
  })

  await t.test('a request the HTTP parser refused has one access line, with its id and the parser\'s code: the parser\'s before any route, else its route\'s', async (t) => {
    type Line = { level: number, msg: string, reqId: string, res: { statusCode: number }, code: string, parserError: string }
    const parsed = (): Line[] => lines.map((line) => JSON.parse(line) as Line)
    const refused = parsed().filter((line) => line.msg === 'request refused by the HTTP parser')
    t.ok(refused.some((line) => line.res.statusCode === 431 && line.parserError === 'HPE_HEADER_OVERFLOW'), 'the oversized headers')
    t.ok(refused.every((line) => line.level === 30 && line.code === 'VALIDATION_FAILED'))
    // Routed, then refused in its body: the route's line, written once its connection closed.
    const routed: Array<[string, number, string]> = [['broken-body-1', 400, 'HPE_INVALID_CHUNK_SIZE'], ['slow-body-1', 408, 'ERR_HTTP_REQUEST_TIMEOUT']]
    for (let i = 0; i < 100 && !routed.every(([id]) => parsed().some((line) => line.reqId === id && line.msg === 'request completed')); i++) await sleep(20)
    for (const [id, status, parserError] of routed) {
      const access = parsed().filter((line) => line.reqId === id && (line.msg === 'request completed' || line.msg.startsWith('request refused')))
      t.equal(access.length, 1, `${id}: one access line`)
      t.match(access[0], { level: 30, msg: 'request completed', res: { statusCode: status }, code: 'VALIDATION_FAILED', parserError }, `${id}: its route's`)
    }
  })

  await t.test('no log line carries the key, the token, the email or the reason', async (t) => {
    scanLogs(t, lines, { 'API key': SANDBOX_KEY, 'session token': token, email: alice.email, reason })
  })
})

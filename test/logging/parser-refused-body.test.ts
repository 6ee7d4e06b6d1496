import t, { type Test } from 'tap'
import { connect } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { captureLogs, listen, startSandboxedApp } from '../fault/support.js'
import { redisClient, startRedis } from '../helpers/redis.js'
import { parseExposition } from '../helpers/metrics.js'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'
import type { App } from '../../src/app.js'

/**
 * One request, one access line, one count. A request whose route was serving it when Node's HTTP
 * parser refused its body (a broken chunk, a client that closed mid-body, a body too slow: see
 * audit-trail.test.ts for the 408) is answered on its socket by the parser's handler, and its
 * route, never answered, then fails to read the body: its one access line is the route's, with
 * the status written on the socket and the parser's error code, and it is counted once, in
 * http_request_duration_seconds under its route with that status, not among the refusals before
 * routing. A request no route takes keeps the parser's line and that count.
 */

const alice = DEMO_PATIENTS[0]!
const id = alice.appointments[0]!.id

interface AccessLine { msg: string, reqId: string, res: { statusCode: number }, code?: string, parserError?: string, audit?: { status?: number, outcome?: string | null } }

/** The access lines of one request: its route's, or one of the refusals written without a route. */
function accessLines (lines: readonly string[], requestId: string): AccessLine[] {
  return lines.map((line) => JSON.parse(line) as AccessLine)
    .filter((line) => line.reqId === requestId && (line.msg === 'request completed' || line.msg.startsWith('request refused')))
}

type Ending = 'read' | 'fin' | 'rst'

/**
 * Writes `chunks` on a raw connection, `gapMs` apart; then reads until the server closes it
 * (`read`), or ends its own side (`fin`) or resets it (`rst`) at once. Gives back what it
 * received, once the connection is closed (at most 3 s). Its own end or reset comes `gapMs` after
 * the last chunk.
 */
function exchange (port: number, chunks: readonly string[], gapMs: number, ending: Ending): Promise<string> {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1')
    let received = ''
    const finish = (): void => {
      clearTimeout(giveUp)
      socket.destroy()
      resolve(received)
    }
    const giveUp = setTimeout(finish, 3000)
    socket.on('data', (chunk: Buffer) => { received += chunk.toString('latin1') })
    socket.on('error', () => {})
    socket.on('close', finish)
    const writeAll = async (): Promise<void> => {
      for (const [i, chunk] of chunks.entries()) {
        if (i > 0) await sleep(gapMs)
        if (socket.destroyed) return
        socket.write(chunk)
      }
      if (ending === 'read') return
      // What was written has reached the server before a reset, which would drop it.
      await sleep(gapMs)
      if (ending === 'fin') socket.end()
      else socket.resetAndDestroy()
    }
    socket.on('connect', () => { writeAll().catch(finish) })
  })
}

/** The counts an answer moves: the request durations (count) and the refusals before routing, by labels. */
async function counts (app: App): Promise<Map<string, number>> {
  const samples = parseExposition(await app.metrics.registry.metrics())
  const counted = new Map<string, number>()
  for (const sample of samples) {
    if (sample.name === 'http_request_duration_seconds_count') counted.set(`${sample.labels.method} ${sample.labels.route} ${sample.labels.status_code}`, sample.value)
    if (sample.name === 'bff_http_refused_before_routing_total') counted.set(`refused ${sample.labels.status_code}`, sample.value)
  }
  return counted
}

/** What moved between two readings of `counts`. */
function moved (before: Map<string, number>, after: Map<string, number>): Record<string, number> {
  const changes: Record<string, number> = {}
  for (const [key, value] of after) {
    const change = value - (before.get(key) ?? 0)
    if (change !== 0) changes[key] = change
  }
  return changes
}

/**
 * The access lines of `requestId` once it has the one expected (`msg`; at most 3 s), and a little
 * later, for any second one.
 */
async function settled (lines: readonly string[], requestId: string, msg = 'request completed'): Promise<AccessLine[]> {
  const by = Date.now() + 3000
  while (!accessLines(lines, requestId).some((line) => line.msg === msg) && Date.now() < by) await sleep(20)
  await sleep(200)
  return accessLines(lines, requestId)
}

const chunked = (method: string, path: string, requestId: string, token: string | null): string =>
  `${method} ${path} HTTP/1.1\r\nhost: x\r\nx-request-id: ${requestId}\r\n${token === null ? '' : `authorization: Bearer ${token}\r\n`}` +
  'content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n'

const BROKEN_CHUNK = 'ZZ\r\n'

interface Expected {
  line: Partial<AccessLine>
  /** What the request moved in the metrics (request durations as `METHOD route status`). */
  counted: Record<string, number>
}

function checkOne (t: Test, found: AccessLine[], expected: Expected['line'], what: string): void {
  t.equal(found.length, 1, `${what}: one access line`)
  t.match(found[0], expected, `${what}: its line`)
  // Absent where the parser wrote nothing for the request.
  if (expected.parserError === undefined) t.notOk(found[0]?.parserError, `${what}: no parser error code`)
}

t.test('each routed request whose body the HTTP parser refused has one access line, its route\'s, and one count', async (t) => {
  const { lines, stream } = captureLogs()
  const { app, sandbox, token } = await startSandboxedApp(t, { upstreamTimeoutMs: 2000, email: alice.email, logStream: stream })
  const port = Number(new URL(await listen(app)).port)
  const cancel = `/appointments/${id}/cancel`
  const cases: Array<{ what: string, requestId: string, chunks: string[], ending: Ending, slowList?: boolean, statuses: string[], expected: Expected }> = [
    {
      what: 'a body the route parses, its chunk broken',
      requestId: 'session-broken',
      chunks: [chunked('POST', '/auth/session', 'session-broken', null), BROKEN_CHUNK],
      ending: 'read',
      statuses: ['400'],
      expected: {
        line: { msg: 'request completed', res: { statusCode: 400 }, code: 'VALIDATION_FAILED', parserError: 'HPE_INVALID_CHUNK_SIZE' },
        counted: { 'POST /auth/session 400': 1 }
      }
    },
    {
      what: 'a cancel\'s body, its chunk broken',
      requestId: 'cancel-broken',
      chunks: [chunked('POST', cancel, 'cancel-broken', token), BROKEN_CHUNK],
      ending: 'read',
      statuses: ['400'],
      expected: {
        line: { msg: 'request completed', res: { statusCode: 400 }, code: 'VALIDATION_FAILED', parserError: 'HPE_INVALID_CHUNK_SIZE', audit: { status: 400, outcome: 'VALIDATION_FAILED' } },
        counted: { 'POST /appointments/:id/cancel 400': 1 }
      }
    },
    {
      what: 'a cancel refused before its body arrived (no session), then its chunk broken',
      requestId: 'refused-then-broken',
      chunks: [chunked('POST', cancel, 'refused-then-broken', null), BROKEN_CHUNK],
      ending: 'read',
      statuses: ['401'],
      expected: {
        line: { msg: 'request completed', res: { statusCode: 401 }, code: 'SESSION_REQUIRED', audit: { status: 401, outcome: 'SESSION_REQUIRED' } },
        counted: { 'POST /appointments/:id/cancel 401': 1 }
      }
    },
    {
      what: 'a GET whose route answers without reading its body, the body broken before that answer',
      requestId: 'get-broken',
      chunks: [chunked('GET', '/appointments', 'get-broken', token), BROKEN_CHUNK],
      ending: 'read',
      slowList: true,
      statuses: ['400'],
      expected: {
        line: { msg: 'request completed', res: { statusCode: 400 }, code: 'VALIDATION_FAILED', parserError: 'HPE_INVALID_CHUNK_SIZE' },
        counted: { 'GET /appointments 400': 1 }
      }
    },
    {
      what: 'a cancel whose client ends its side mid-body',
      requestId: 'cancel-fin',
      chunks: [chunked('POST', cancel, 'cancel-fin', token)],
      ending: 'fin',
      statuses: ['400'],
      expected: {
        line: { msg: 'request completed', res: { statusCode: 400 }, code: 'VALIDATION_FAILED', parserError: 'HPE_INVALID_EOF_STATE', audit: { status: 400, outcome: 'VALIDATION_FAILED' } },
        counted: { 'POST /appointments/:id/cancel 400': 1 }
      }
    },
    {
      what: 'a cancel whose client resets its connection mid-body',
      requestId: 'cancel-rst',
      chunks: [chunked('POST', cancel, 'cancel-rst', token), '1\r\n{'],
      ending: 'rst',
      statuses: [],
      expected: {
        line: { msg: 'request completed', res: { statusCode: 400 }, code: 'VALIDATION_FAILED', audit: { status: 400, outcome: 'VALIDATION_FAILED' } },
        counted: { 'POST /appointments/:id/cancel 400': 1 }
      }
    },
    {
      what: 'a DELETE with a body no route takes, its chunk broken',
      requestId: 'no-route-broken',
      chunks: [chunked('DELETE', '/appointments', 'no-route-broken', token), BROKEN_CHUNK],
      ending: 'read',
      statuses: ['400'],
      expected: {
        line: { msg: 'request refused by the HTTP parser', res: { statusCode: 400 }, code: 'VALIDATION_FAILED', parserError: 'HPE_INVALID_CHUNK_SIZE' },
        counted: { 'refused 400': 1 }
      }
    },
    {
      what: 'an OPTIONS (no preflight) to a routed path, its chunk broken',
      requestId: 'options-broken',
      chunks: [chunked('OPTIONS', cancel, 'options-broken', token), BROKEN_CHUNK],
      ending: 'read',
      // Answered (204) by the OPTIONS handling before its body was read; the parser's refusal
      // after that answer writes nothing, and its one line is that answer's.
      statuses: ['204'],
      expected: {
        line: { msg: 'request completed', res: { statusCode: 204 } },
        counted: { 'OPTIONS not_found 204': 1 }
      }
    },
    {
      what: 'a request whose header lines are broken, before any route',
      requestId: 'never-routed',
      chunks: ['GET /healthz HTTP/1.1\r\nhost: x\r\nx-request-id: never-routed\r\nbad header\r\n\r\n'],
      ending: 'read',
      statuses: ['400'],
      expected: {
        // The request id of a request whose headers never parsed is a new one: found below by its count.
        line: { msg: 'request refused by the HTTP parser', res: { statusCode: 400 }, code: 'VALIDATION_FAILED' },
        counted: { 'refused 400': 1 }
      }
    }
  ]
  for (const { what, requestId, chunks, ending, slowList, statuses, expected } of cases) {
    const before = await counts(app)
    const parserLinesBefore = lines.filter((line) => line.includes('"request refused by the HTTP parser"')).length
    if (slowList === true) sandbox.control.setFailure({ kind: 'slow', delayMs: 400, endpoint: 'list', times: 1 })
    const received = await exchange(port, chunks, 150, ending)
    t.same([...received.matchAll(/HTTP\/1\.1 (\d{3}) /g)].map((match) => match[1]), statuses, `${what}: answered ${statuses.join(', ') || 'nothing'}`)
    if (requestId === 'never-routed') {
      await sleep(300)
      t.equal(lines.filter((line) => line.includes('"request refused by the HTTP parser"')).length - parserLinesBefore, 1, `${what}: the parser's line`)
    } else {
      checkOne(t, await settled(lines, requestId, expected.line.msg), expected.line, what)
    }
    t.same(moved(before, await counts(app)), expected.counted, `${what}: counted once`)
  }
})

t.test('a routed request pipelined behind another, its body broken: one line each, in their routes\' counts', async (t) => {
  const { lines, stream } = captureLogs()
  const { app, sandbox, token } = await startSandboxedApp(t, { upstreamTimeoutMs: 2000, email: alice.email, logStream: stream })
  const port = Number(new URL(await listen(app)).port)
  const first = `GET /appointments HTTP/1.1\r\nhost: x\r\nx-request-id: ahead\r\nauthorization: Bearer ${token}\r\n\r\n`

  // Its body broken while the request ahead of it is still served: the 400 waits for that answer.
  const before = await counts(app)
  sandbox.control.setFailure({ kind: 'slow', delayMs: 300, endpoint: 'list', times: 1 })
  const received = await exchange(port, [first + chunked('POST', '/auth/session', 'behind', null), BROKEN_CHUNK], 100, 'read')
  t.same([...received.matchAll(/HTTP\/1\.1 (\d{3}) /g)].map((match) => match[1]), ['200', '400'], 'both answered, in order')
  checkOne(t, await settled(lines, 'ahead'), { msg: 'request completed', res: { statusCode: 200 } }, 'the request ahead')
  checkOne(t, await settled(lines, 'behind'), { msg: 'request completed', res: { statusCode: 400 }, code: 'VALIDATION_FAILED', parserError: 'HPE_INVALID_CHUNK_SIZE' }, 'the broken one behind it')
  t.same(moved(before, await counts(app)), { 'GET /appointments 200': 1, 'POST /auth/session 400': 1 }, 'each counted once, under its route')

  // Refused before its body arrived (no session), queued behind the slow answer: its 401 only.
  const later = await counts(app)
  sandbox.control.setFailure({ kind: 'slow', delayMs: 300, endpoint: 'list', times: 1 })
  const refused = await exchange(port, [first.replace('ahead', 'ahead-2') + chunked('POST', `/appointments/${id}/cancel`, 'refused-behind', null), BROKEN_CHUNK], 100, 'read')
  t.same([...refused.matchAll(/HTTP\/1\.1 (\d{3}) /g)].map((match) => match[1]), ['200', '401'], 'its own answer only')
  checkOne(t, await settled(lines, 'refused-behind'), { msg: 'request completed', res: { statusCode: 401 }, code: 'SESSION_REQUIRED', audit: { status: 401 } }, 'the refused one behind')
  t.same(moved(later, await counts(app)), { 'GET /appointments 200': 1, 'POST /appointments/:id/cancel 401': 1 }, 'each counted once')
})

t.test('a body refused while its route\'s hooks still wait (for Redis), its client gone meanwhile: one line, its route\'s', async (t) => {
  const { lines, stream } = captureLogs()
  const redis = await startRedis(t)
  const { app, token } = await startSandboxedApp(t, { upstreamTimeoutMs: 2000, email: alice.email, logStream: stream, redis })
  const port = Number(new URL(await listen(app)).port)
  const admin = redisClient(redis.url)
  t.teardown(() => { admin.disconnect() })
  const cancel = `/appointments/${id}/cancel`
  const cases: Array<[string, string, string, Ending, Partial<AccessLine>]> = [
    // The parser answers the broken chunk; the connection is closed before the hooks are done.
    ['a broken chunk, then the client ends its side', 'hooks-wait-fin', BROKEN_CHUNK, 'fin', { res: { statusCode: 400 }, parserError: 'HPE_INVALID_CHUNK_SIZE' }],
    // The client resets the connection mid-body: no answer is written.
    ['a body cut off by a reset', 'hooks-wait-rst', '1\r\n{', 'rst', { res: { statusCode: 400 } }]
  ]
  for (const [what, requestId, tail, ending, expected] of cases) {
    const before = await counts(app)
    // Under Redis's command timeout (250 ms): the session lookup waits, then succeeds.
    await admin.call('CLIENT', 'PAUSE', '150', 'ALL')
    await exchange(port, [chunked('POST', cancel, requestId, token) + tail], 30, ending)
    const found = await settled(lines, requestId)
    t.equal(found.length, 1, `${what}: one access line`)
    t.match(found[0], { msg: 'request completed', code: 'VALIDATION_FAILED', audit: { outcome: 'VALIDATION_FAILED' }, ...expected }, `${what}: its route's, with its audit record`)
    t.same(moved(before, await counts(app)), { 'POST /appointments/:id/cancel 400': 1 }, `${what}: counted once`)
  }
  // The whole body arrived, then the client left while the hooks waited: its body can no longer be
  // read (Node destroyed the request), so it ends as a body cut off, with its line; no cancel sent.
  const before = await counts(app)
  const body = JSON.stringify({ reason: 'whole body, then gone' })
  await admin.call('CLIENT', 'PAUSE', '150', 'ALL')
  await exchange(port, [`POST ${cancel} HTTP/1.1\r\nhost: x\r\nx-request-id: hooks-wait-whole\r\nauthorization: Bearer ${token}\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n${body}`], 30, 'fin')
  const found = await settled(lines, 'hooks-wait-whole')
  checkOne(t, found, { msg: 'request completed', res: { statusCode: 400 }, code: 'VALIDATION_FAILED', audit: { outcome: 'VALIDATION_FAILED' } }, 'a whole body, then the client ends its side')
  t.same(moved(before, await counts(app)), { 'POST /appointments/:id/cancel 400': 1 }, 'a whole body: counted once')
})

import t, { type Test } from 'tap'
import { spawn, type ChildProcessByStdio } from 'node:child_process'
import { connect, type Socket } from 'node:net'
import { once } from 'node:events'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import type { Readable } from 'node:stream'
import { startIssuer, type TestIssuer } from '../helpers/issuer.js'
import { SANDBOX_KEY, startSandbox, type RunningSandbox } from '../helpers/sandbox.js'
import { DEMO_PATIENTS } from '../../src/care360/sandbox.js'
import { call, checkAnswers, scanLogs, type Answer } from './support.js'
import { freePort } from '../helpers/ports.js'

/**
 * The real server process (src/server.ts through tsx: the built dist/ may lag behind src/ while
 * others work, tsx runs what is checked in) receives SIGTERM while requests are in flight against
 * a slow upstream: they complete with their answers and close their connections, /readyz says 503
 * to a request that arrives on a connection still open, new connections are refused, and the
 * process exits 0 as soon as the last answer is out, well within its 10 s deadline.
 */

// Six real server processes, each compiled on the fly by tsx: past tap's 60 s per file on a loaded
// 2-core machine. Still bounded.
t.setTimeout(150_000)

const ROOT = fileURLToPath(new URL('../../', import.meta.url))
const alice = DEMO_PATIENTS[0]!
const UPSTREAM_DELAY_MS = 1200

/** A raw keep-alive connection: one request now, another later, on the same socket. */
function rawConnection (port: number): { socket: Socket, send: (text: string) => void, next: (timeoutMs: number) => Promise<string> } {
  const socket = connect(port, '127.0.0.1')
  socket.on('error', () => {})
  let buffer = ''
  let waiter: (() => void) | null = null
  socket.on('data', (chunk: Buffer) => {
    buffer += chunk.toString('latin1')
    waiter?.()
  })
  socket.on('close', () => waiter?.())
  /** The next whole answer (content-length framed). */
  async function next (timeoutMs: number): Promise<string> {
    const end = Date.now() + timeoutMs
    for (;;) {
      const head = buffer.indexOf('\r\n\r\n')
      if (head !== -1) {
        const length = Number(/content-length: *(\d+)/i.exec(buffer.slice(0, head))?.[1] ?? 0)
        if (buffer.length >= head + 4 + length) {
          const answer = buffer.slice(0, head + 4 + length)
          buffer = buffer.slice(head + 4 + length)
          return answer
        }
      }
      if (socket.destroyed || Date.now() > end) throw new Error(`no whole answer on the raw connection (${buffer.length} bytes)`)
      await new Promise<void>((resolve) => {
        waiter = resolve
        setTimeout(resolve, 50)
      })
      waiter = null
    }
  }
  return { socket, send: (text) => { socket.write(text) }, next }
}

interface ServerProcess {
  child: ChildProcessByStdio<null, Readable, Readable>
  origin: string
  port: number
  out: string[]
  err: string[]
  exited: Promise<[number | null, NodeJS.Signals | null]>
}

/** `src/server.ts` as production runs it, against the issuer and the sandbox; null (a failed assertion) if it never gets ready. */
async function startServer (t: Test, issuer: TestIssuer, sandbox: RunningSandbox, env: Record<string, string> = {}): Promise<ServerProcess | null> {
  const port = await freePort()
  const origin = `http://127.0.0.1:${port}`
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/server.ts'], {
    cwd: ROOT,
    env: {
      PATH: process.env.PATH ?? '',
      // tap follows spawned processes; a tsx-compiled child's coverage of src/ maps onto other
      // lines than the suite's own and would corrupt its report.
      _TAPJS_PROCESSINFO_COVERAGE_: '0',
      NODE_ENV: 'production',
      CV_API_KEY: SANDBOX_KEY,
      CV_BASE_URL: sandbox.url,
      CV_TIMEOUT_MS: '5000',
      OIDC_ISSUER: issuer.url,
      OIDC_CLIENT_ID: issuer.clientId,
      HOST: '127.0.0.1',
      PORT: String(port),
      METRICS_PORT: '0',
      LOG_LEVEL: 'info',
      RATE_LIMIT_CANCEL: '100/1m',
      ...env
    },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  const out: string[] = []
  const err: string[] = []
  child.stdout.on('data', (chunk: Buffer) => out.push(chunk.toString()))
  child.stderr.on('data', (chunk: Buffer) => err.push(chunk.toString()))
  const exited = once(child, 'exit') as Promise<[number | null, NodeJS.Signals | null]>
  t.teardown(() => { if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL') })

  // Ready within a generous bound (tsx compiles on the fly on a loaded 2-core machine).
  const readyBy = Date.now() + 20_000
  for (;;) {
    const ready = await call(origin, { path: '/readyz', timeoutMs: 1000 }).catch(() => null)
    if (ready?.status === 200) return { child, origin, port, out, err, exited }
    if (child.exitCode !== null || Date.now() > readyBy) {
      t.fail(`the server did not become ready: ${err.join('').slice(0, 500)}`)
      return null
    }
    await sleep(100)
  }
}

t.test('SIGTERM with requests in flight: they complete, /readyz drains, the process exits 0', async (t) => {
  const issuer = await startIssuer(t)
  const sandbox = await startSandbox(t)
  const server = await startServer(t, issuer, sandbox)
  if (server === null) return
  const { child, origin, port, out, err, exited } = server

  const idToken = await issuer.sign({ email: alice.email, sub: 'sub-alice' })
  const session = await call(origin, { method: 'POST', path: '/auth/session', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ idToken }) })
  t.equal(session.status, 201)
  const token = (JSON.parse(session.body) as { data: { token: string } }).data.token
  const auth = { authorization: `Bearer ${token}` }
  const reason = 'Private reason: sigterm drain test'

  // Every upstream call now takes a while: the requests below are in flight at SIGTERM.
  sandbox.control.setFailure({ kind: 'slow', delayMs: UPSTREAM_DELAY_MS })
  const keepAlive = rawConnection(port)
  keepAlive.send(`GET /appointments HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${token}\r\n\r\n`)
  const inFlight: Array<Promise<{ label: string, answer: Answer }>> = []
  for (let i = 0; i < 3; i++) {
    inFlight.push(call(origin, { path: '/appointments', headers: auth, timeoutMs: 8000 }).then((answer) => ({ label: 'list', answer })))
  }
  inFlight.push(call(origin, {
    method: 'POST',
    path: `/appointments/${alice.appointments[0]!.id}/cancel`,
    headers: { ...auth, 'content-type': 'application/json' },
    body: JSON.stringify({ reason }),
    timeoutMs: 8000
  }).then((answer) => ({ label: 'cancel', answer })))
  // All five have reached the upstream (the cancel's ownership list first) before the signal.
  const reachedBy = Date.now() + 3000
  while (sandbox.control.calls.length < 5 && Date.now() < reachedBy) await sleep(10)
  t.equal(sandbox.control.calls.length, 5, 'five upstream calls in flight')
  // A client halfway through its request's head: its connection is not idle, so it stays open.
  const halfSent = rawConnection(port)
  halfSent.send('GET /readyz HTTP/1.1\r\nhost: x\r\n')
  await sleep(50)

  const signalledAt = Date.now()
  child.kill('SIGTERM')

  // New connections are refused soon after the signal.
  let refused = false
  while (!refused && Date.now() - signalledAt < 1000) {
    const attempt = await call(origin, { path: '/healthz', timeoutMs: 500 }).then(() => null, (error: NodeJS.ErrnoException) => error)
    refused = attempt?.code === 'ECONNREFUSED'
    if (!refused) await sleep(25)
  }
  t.ok(refused, 'a new connection is refused while draining')

  // The request that arrives whole during the drain sees it, and its connection closes.
  halfSent.send('\r\n')
  const readyz = await halfSent.next(3000).catch((error: Error) => error.message)
  t.match(readyz, /^HTTP\/1\.1 503 /, '/readyz answers 503 while draining')
  t.match(readyz, /"Draining"/)
  t.match(readyz, /\r\nconnection: close\r\n/i)

  // A request pipelined behind the slow one on a kept-alive connection: both are answered, the
  // slow one's answer keeping the connection open for the one behind it, whose answer closes it
  // (Node writes nothing behind an answer that closes its connection, and would still have run it).
  keepAlive.send('GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n')
  const first = await keepAlive.next(8000)
  t.match(first, /^HTTP\/1\.1 200 /, 'the in-flight request on the kept-alive connection completes')
  t.notMatch(first, /\r\nconnection: close\r\n/i, 'and leaves the connection open for the request behind it')
  const pipelined = await keepAlive.next(3000).catch((error: Error) => error.message)
  t.match(pipelined, /^HTTP\/1\.1 503 /, 'which is answered: draining')
  t.match(pipelined, /\r\nconnection: close\r\n/i, 'and closes the connection')
  const after = await keepAlive.next(3000).catch((error: Error) => error.message)
  t.match(after, /^no whole answer on the raw connection/, 'the connection closes after it')
  t.ok(keepAlive.socket.destroyed)

  const answers = await Promise.all(inFlight)
  for (const { label, answer } of answers) {
    t.equal(answer.status, 200, `in-flight ${label} completed with its answer`)
  }
  checkAnswers(t, answers)
  t.ok(sandbox.control.isCancelled(alice.appointments[0]!.id), 'the in-flight cancel took effect')

  const [code, signal] = await Promise.race([
    exited,
    sleep(10_000).then(() => [null, 'timeout'] as const)
  ])
  t.equal(code, 0, 'the process exits 0')
  t.equal(signal, null)
  t.ok(Date.now() - signalledAt < 10_000, `exited ${Date.now() - signalledAt} ms after SIGTERM, within the 10 s deadline`)
  const stderr = err.join('').split('\n').filter((line) => line.trim() !== '' && !/^\(node:\d+\) \[\w+\]|^\(Use `node --trace-/.test(line))
  t.same(stderr, [], 'nothing on stderr but Node\'s own warnings')

  const lines = out.join('').split('\n').filter((line) => line.trim() !== '')
  t.ok(lines.some((line) => line.includes('shutting down')), 'the shutdown is logged')
  // The in-flight requests answered moments before the exit: their access lines were still in
  // the log's batch then, and reach stdout only through the flush at exit.
  const answered = lines.map((line) => JSON.parse(line) as { msg?: string, req?: { url?: string }, res?: { statusCode?: number }, audit?: { outcome?: string } })
    .filter((line) => line.msg === 'request completed' && line.res?.statusCode === 200)
  t.equal(answered.filter((line) => line.req?.url === '/appointments').length, 4, 'the access lines of the four in-flight lists were written before the exit')
  t.equal(answered.filter((line) => line.audit?.outcome === 'cancelled').length, 1, 'the in-flight cancel\'s access line, with its audit record, was written before the exit')
  scanLogs(t, lines, {
    'API key': SANDBOX_KEY,
    'session token': token,
    'ID token': idToken,
    email: alice.email,
    reason
  })
})

t.test('a broken stdout does not hold up the exit: the last batch of log lines is dropped, the process exits 0', async (t) => {
  const issuer = await startIssuer(t)
  const sandbox = await startSandbox(t)
  const server = await startServer(t, issuer, sandbox)
  if (server === null) return
  // The log shipper is gone: the read end of the pipe closes, and writes to stdout fail (EPIPE).
  server.child.stdout.destroy()
  // An access line waits in the batch, to be flushed at exit.
  t.equal((await call(server.origin, { path: '/healthz' })).status, 200)
  const signalledAt = Date.now()
  server.child.kill('SIGTERM')
  const [code, signal] = await Promise.race([
    server.exited,
    sleep(10_000).then(() => [null, 'timeout'] as const)
  ])
  t.equal(code, 0, 'the process exits 0')
  t.equal(signal, null, 'on its own, within the 10 s deadline')
  t.ok(Date.now() - signalledAt < 10_000, `exited ${Date.now() - signalledAt} ms after SIGTERM`)
  t.notMatch(server.err.join(''), /Error|EPIPE/, 'no error on stderr')
})

t.test('a keep-alive connection busy at SIGTERM is closed after its answer: the exit does not wait for it', async (t) => {
  const issuer = await startIssuer(t)
  const sandbox = await startSandbox(t)
  const server = await startServer(t, issuer, sandbox)
  if (server === null) return
  const idToken = await issuer.sign({ email: alice.email, sub: 'sub-alice' })
  const session = await call(server.origin, { method: 'POST', path: '/auth/session', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ idToken }) })
  const token = (JSON.parse(session.body) as { data: { token: string } }).data.token

  // A load balancer's kept-alive connection, with a request in flight and nothing after it.
  sandbox.control.setFailure({ kind: 'slow', delayMs: UPSTREAM_DELAY_MS })
  const connection = rawConnection(server.port)
  const closed = once(connection.socket, 'close')
  connection.send(`GET /appointments HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${token}\r\n\r\n`)
  const reachedBy = Date.now() + 3000
  while (sandbox.control.calls.length < 1 && Date.now() < reachedBy) await sleep(10)
  t.equal(sandbox.control.calls.length, 1, 'the request is in flight')

  const signalledAt = Date.now()
  server.child.kill('SIGTERM')
  const answer = await connection.next(8000)
  t.match(answer, /^HTTP\/1\.1 200 /, 'the in-flight request completes')
  t.match(answer, /\r\nconnection: close\r\n/i, 'its answer tells the client the connection closes')
  await Promise.race([closed, sleep(3000)])
  t.ok(connection.socket.destroyed, 'the server closes the connection after the answer')
  const [code] = await Promise.race([server.exited, sleep(10_000).then(() => [null] as const)])
  const took = Date.now() - signalledAt
  t.equal(code, 0, 'the process exits 0')
  t.ok(took < UPSTREAM_DELAY_MS + 3000, `exited ${took} ms after SIGTERM, soon after the last answer, not at the 10 s deadline`)
})

t.test('SHUTDOWN_DELAY: after SIGTERM the process stays unready but serving for that long, then drains and exits 0', async (t) => {
  const issuer = await startIssuer(t)
  const sandbox = await startSandbox(t)
  const server = await startServer(t, issuer, sandbox, { SHUTDOWN_DELAY: '1500ms' })
  if (server === null) return
  const signalledAt = Date.now()
  server.child.kill('SIGTERM')
  await sleep(300)
  const readyz = await call(server.origin, { path: '/readyz', timeoutMs: 1000 })
  t.equal(readyz.status, 503, 'a new connection is still accepted, and told the replica is going')
  t.equal(readyz.headers.connection, 'close')
  t.equal((await call(server.origin, { path: '/healthz', timeoutMs: 1000 })).status, 200, 'and still served')
  const [code] = await Promise.race([server.exited, sleep(10_000).then(() => [null] as const)])
  t.equal(code, 0)
  const took = Date.now() - signalledAt
  t.ok(took >= 1400 && took < 10_000, `exited ${took} ms after SIGTERM, once the delay had passed`)
})

t.test('the metrics listener answers through the drain: it closes last', async (t) => {
  const issuer = await startIssuer(t)
  const sandbox = await startSandbox(t)
  const metricsPort = await freePort()
  const server = await startServer(t, issuer, sandbox, { METRICS_PORT: String(metricsPort) })
  if (server === null) return
  const metrics = `http://127.0.0.1:${metricsPort}`
  t.equal((await call(metrics, { path: '/metrics' })).status, 200)
  const idToken = await issuer.sign({ email: alice.email, sub: 'sub-alice' })
  const session = await call(server.origin, { method: 'POST', path: '/auth/session', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ idToken }) })
  const token = (JSON.parse(session.body) as { data: { token: string } }).data.token
  // A request in flight keeps the drain going for a while after the signal.
  sandbox.control.setFailure({ kind: 'slow', delayMs: UPSTREAM_DELAY_MS })
  const inFlight = call(server.origin, { path: '/appointments', headers: { authorization: `Bearer ${token}` }, timeoutMs: 8000 })
  const reachedBy = Date.now() + 3000
  while (sandbox.control.calls.length < 1 && Date.now() < reachedBy) await sleep(10)
  server.child.kill('SIGTERM')
  await sleep(300)
  const scrape = await call(metrics, { path: '/metrics', timeoutMs: 1000 }).then((answer) => answer.status, (error: NodeJS.ErrnoException) => error.code)
  t.equal(scrape, 200, 'scraped during the drain')
  t.equal((await inFlight).status, 200)
  const [code] = await Promise.race([server.exited, sleep(10_000).then(() => [null] as const)])
  t.equal(code, 0)
})

t.test('a second SIGTERM during the drain exits 1 at once, cutting off the request still running; the lines already batched are flushed', async (t) => {
  const issuer = await startIssuer(t)
  const sandbox = await startSandbox(t)
  const server = await startServer(t, issuer, sandbox)
  if (server === null) return
  const { child, origin, out, exited } = server
  const idToken = await issuer.sign({ email: alice.email, sub: 'sub-alice' })
  const session = await call(origin, { method: 'POST', path: '/auth/session', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ idToken }) })
  t.equal(session.status, 201)
  const token = (JSON.parse(session.body) as { data: { token: string } }).data.token
  // A list the upstream holds for 6 s: still running when the second signal comes.
  sandbox.control.setFailure({ kind: 'slow', delayMs: 6000 })
  const running = call(origin, { path: '/appointments', headers: { authorization: `Bearer ${token}` }, timeoutMs: 8000 }).then((answer) => answer.status, () => 'cut off')
  const reachedBy = Date.now() + 3000
  while (sandbox.control.calls.length < 1 && Date.now() < reachedBy) await sleep(10)
  t.equal(sandbox.control.calls.length, 1, 'the list reached the upstream')
  child.kill('SIGTERM')
  await sleep(300)
  t.equal(child.exitCode, null, 'the first SIGTERM drains: still running')
  const secondAt = Date.now()
  child.kill('SIGTERM')
  const [code, signal] = await Promise.race([exited, sleep(5000).then(() => [null, 'timeout'] as const)])
  t.equal(code, 1, 'the second SIGTERM exits 1')
  t.equal(signal, null)
  t.ok(Date.now() - secondAt < 3000, `at once (${Date.now() - secondAt} ms), not after the request`)
  t.equal(await running, 'cut off', 'the running request got no answer')
  const lines = out.join('').split('\n').filter((line) => line.trim() !== '').map((line) => JSON.parse(line) as { msg?: string, req?: { url?: string } })
  t.ok(lines.some((line) => line.msg === 'request completed' && line.req?.url === '/auth/session'), 'the sign-in\'s access line, batched before the signals, is written at the exit')
  t.notOk(lines.some((line) => line.msg === 'request completed' && line.req?.url === '/appointments'), 'the list cut off has none')
})
